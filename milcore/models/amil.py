"""AMiL: anomaly-aware MIL -- attention pooling steered by each cell's anomaly w.r.t. control cells.

Reference:
    Kazeminia, Sadafi, Makhro, Bogdanova, Albarqouni, Marr. "Anomaly-Aware Multiple Instance Learning
    for Rare Anemia Disorder Classification." MICCAI 2022.

Per instance: embedding ``h_i = ReLU(W x_i)``; anomaly ``a_i``: the Mahalanobis distance of ``h_i`` to a
Gaussian fitted on the embeddings of cells from **control (healthy) bags** (label
``config.normal_class``), as ``log1p(d^2 / E)`` standardised by its mean and std over control cells, so
~0 for normal cells and large for cells unlike any control cell -- including cells of classes never seen
in training. The attention logit is the gated-attention score plus ``softplus(beta) * a_i`` (``beta``
learned, >= 0), so anomalous cells contribute more to the bag embedding. An instance classifier gives a
**single-instance auxiliary loss**: every cell takes its bag's label, weighted by its (detached)
attention times the bag size in disease bags and uniformly in control bags (``aux_losses["instance"]``).

The Gaussian is **refreshed during training** because ``h`` changes as ``W`` learns:

* online, like BatchNorm statistics: in ``train()`` mode, a ``forward`` given ``labels`` updates running
  mean and covariance from the control bags of the batch (``momentum``; the covariances are mixed with
  their means' spread, which equals a running second moment minus the running mean's square without its
  float32 cancellation) and re-derives the whitening;
* by the trainer, via the generic hook ``model.on_epoch_start(EpochContext(epoch, control_instances=fn))``
  (``"control_instances"`` is in :attr:`AMiL.hook_requirements`), which refits on those cells every
  ``refit_every`` epochs; or directly with ``model.fit_normal(x_control)``.

Before any fit, anomaly scores are 0 and AMiL behaves as gated ABMIL. The statistics are buffers (saved in
``state_dict``). Permutation invariant; memory linear in the bag size.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from feature_cache.errors import InvalidArgumentError
from milcore.losses import instance_cross_entropy
from milcore.models.base import AggregatorConfig, EpochContext, MILAggregator, check_range
from milcore.models.layers import GatedAttention, autocast_input, instance_embedding, resize_linear
from milcore.models.output import MILOutput
from milcore.models.registry import register_aggregator
from milcore.models.search import SearchDim, declare_space
from milcore.ops import ptr_to_sizes, segment_softmax, weighted_segment_sum

__all__ = ["AMiL", "AMiLConfig"]

logger = logging.getLogger(__name__)
#: Ridges tried in turn (times the mean variance) when the shrunk control covariance is not numerically
#: positive definite.
JITTERS = (0.0, 1e-6, 1e-4, 1e-2)


def _moments(h: Tensor) -> tuple[Tensor, Tensor]:
    """Mean ``(E,)`` and covariance ``(E, E)`` of ``(M, E)`` embedded cells, centred before the product."""
    mean = h.mean(0)
    centred = h - mean
    return mean, centred.T @ centred / h.shape[0]


@dataclass(frozen=True)
class AMiLConfig(AggregatorConfig):
    """AMiL hyper-parameters.

    Attributes:
        embed_dim: instance embedding width ``E`` (the Gaussian lives in this space).
        attention_dim: hidden width of the gated attention.
        dropout: dropout after the embedding.
        normal_class: label of control (healthy) bags, whose cells define "normal".
        shrinkage: covariance shrinkage towards ``trace/E * I`` (0..1), for a stable inverse.
        momentum: weight of the old statistics in the online refresh (0: last batch only).
        refit_every: refit from ``EpochContext.control_instances`` every this many epochs.
        anomaly_weight: initial ``softplus(beta)``, the weight of the anomaly in the attention logits.
        instance_loss_weight: weight of the single-instance loss in ``aux_losses["instance"]``.
    """

    embed_dim: int = 256
    attention_dim: int = 128
    dropout: float = 0.0
    normal_class: int = 0
    shrinkage: float = 0.1
    momentum: float = 0.9
    refit_every: int = 1
    anomaly_weight: float = 1.0
    instance_loss_weight: float = 0.5

    def validate(self) -> None:
        super().validate()
        check_range("embed_dim", self.embed_dim, 1, integer=True)
        check_range("attention_dim", self.attention_dim, 1, integer=True)
        check_range("dropout", self.dropout, 0.0, 0.99)
        check_range("normal_class", self.normal_class, 0, self.num_classes - 1, integer=True)
        check_range("shrinkage", self.shrinkage, 0.0, 1.0)
        check_range("momentum", self.momentum, 0.0, 0.999)
        check_range("refit_every", self.refit_every, 1, integer=True)
        check_range("anomaly_weight", self.anomaly_weight, 1e-6)
        check_range("instance_loss_weight", self.instance_loss_weight, 0.0)


@register_aggregator("amil", config=AMiLConfig)
class AMiL(MILAggregator):
    """Anomaly-aware MIL (Kazeminia, Sadafi et al. 2022): Mahalanobis anomaly to control cells + attention."""

    casts_input_first = True  # x is read only through autocast_input(x)
    hook_requirements = frozenset({"control_instances"})
    control_class_field = "normal_class"
    search_space = declare_space(
        embed_dim=SearchDim(64, 512, log=True),
        attention_dim=SearchDim(32, 256, log=True),
        shrinkage=SearchDim(0.01, 0.5, log=True),
        anomaly_weight=SearchDim(0.1, 10.0, log=True),
        instance_loss_weight=SearchDim(0.05, 2.0, log=True),
    )

    def __init__(self, config: AMiLConfig) -> None:
        super().__init__(config)
        e = config.embed_dim
        self.embed = instance_embedding(config.in_dim, e, config.dropout)
        self.attention = GatedAttention(e, config.attention_dim, 1, gated=True)
        beta = torch.tensor(config.anomaly_weight).expm1().log()  # softplus^-1
        self.anomaly_beta = nn.Parameter(beta)
        self.head = nn.Linear(e, config.num_classes)
        self.instance_head = nn.Linear(e, config.num_classes)
        self.register_buffer("fitted", torch.tensor(False))
        self.register_buffer("normal_mean", torch.zeros(e))
        self.register_buffer("normal_cov", torch.eye(e))  # central: see _set_stats
        self.register_buffer("whitening", torch.eye(e))
        self.register_buffer("score_stats", torch.tensor([0.0, 1.0]))  # mean, std of control log-scores
        self._warned = False

    # -- the Gaussian of control cells ----------------------------------------------------------------
    @torch.no_grad()
    def fit_normal(self, x_control: Tensor, batch_rows: int = 65536) -> None:
        """Refit the control Gaussian on ``(M, D)`` features of control-bag cells (replaces the stats)."""
        if x_control.dim() != 2 or x_control.shape[1] != self.config.in_dim:
            raise InvalidArgumentError(
                f"amil.fit_normal: expected (M, {self.config.in_dim}) control features, got {tuple(x_control.shape)}"
            )
        if x_control.shape[0] < 2:
            raise InvalidArgumentError("amil.fit_normal: needs at least 2 control cells")
        was_training = self.training
        self.eval()
        x_control = x_control.to(self.normal_mean.device)
        h = torch.cat([self.embed(x_control[i : i + batch_rows].float()) for i in range(0, len(x_control), batch_rows)])
        self.train(was_training)
        self._set_stats(*_moments(h), h, momentum=0.0)
        logger.debug("amil: refitted the control Gaussian on %d cells", h.shape[0])

    @torch.no_grad()
    def _set_stats(self, mean: Tensor, cov: Tensor, h: Tensor, momentum: float) -> None:
        if momentum > 0 and bool(self.fitted):  # mixture of the old and the new Gaussian's first two moments
            shift = self.normal_mean - mean
            spread = momentum * (1 - momentum) * torch.outer(shift, shift)
            cov = momentum * self.normal_cov + (1 - momentum) * cov + spread
            mean = momentum * self.normal_mean + (1 - momentum) * mean
        e = mean.numel()
        stored = cov
        cov = cov.double()
        lam = self.config.shrinkage
        scale = cov.diagonal().mean().clamp_min(1e-6)
        eye = torch.eye(e, dtype=torch.float64, device=cov.device)
        cov = (1 - lam) * cov + (lam * scale + 1e-5) * eye
        for jitter in JITTERS:  # float32 rounding of the stored covariance can leave it barely indefinite
            chol, info = torch.linalg.cholesky_ex(cov + jitter * scale * eye)
            if int(info) == 0:
                break
        else:  # not positive definite even with the largest ridge: keep the previous fit
            if not self._warned:
                logger.warning("amil: control covariance is not positive definite even with a ridge of %g x its "
                               "mean variance; keeping the previous fit (warned once per model)", JITTERS[-1])
                self._warned = True
            return
        if jitter:
            logger.debug("amil: control covariance needed a ridge of %g x its mean variance", jitter)
        whitening = torch.linalg.solve_triangular(chol, eye, upper=False).float()
        self.normal_mean.copy_(mean)
        self.normal_cov.copy_(stored)
        self.whitening.copy_(whitening)
        self.fitted.fill_(True)
        raw = self._log_score(h)
        stats = torch.stack([raw.mean(), raw.std().clamp_min(1e-3) if raw.numel() > 1 else raw.new_tensor(1.0)])
        self.score_stats.copy_(momentum * self.score_stats + (1 - momentum) * stats if momentum > 0 else stats)

    def upgrade_state(self, state: dict[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
        """Checkpoints written before the statistics were kept central hold ``normal_second`` (E[hh^T])."""
        old = state.pop(prefix + "normal_second", None)
        if old is not None and prefix + "normal_cov" not in state:
            mean = state[prefix + "normal_mean"].double()
            state[prefix + "normal_cov"] = (old.double() - torch.outer(mean, mean)).to(old.dtype)
        return state

    def _log_score(self, h: Tensor) -> Tensor:
        z = (h.float() - self.normal_mean) @ self.whitening.T  # (N, E) whitened
        return torch.log1p(z.square().mean(dim=1))  # (N,) log(1 + d^2 / E)

    def anomaly_scores(self, h: Tensor) -> Tensor:
        """Standardised anomaly ``(N,)`` of embedded cells (0 before any fit); no gradient."""
        with torch.no_grad():
            if not bool(self.fitted):
                return h.new_zeros(h.shape[0], dtype=torch.float32)
            return (self._log_score(h) - self.score_stats[0]) / self.score_stats[1]

    def on_epoch_start(self, context: EpochContext) -> None:
        """Refit the Gaussian from ``context.control_instances()`` every ``refit_every`` epochs."""
        if context.control_instances is not None and context.epoch % self.config.refit_every == 0:
            self.fit_normal(context.control_instances())

    # -- forward --------------------------------------------------------------------------------------
    def pool(self, x: Tensor, ptr: Tensor, index: Tensor, coords: Tensor | None, labels: Tensor | None) -> MILOutput:
        h = self.embed(autocast_input(x))  # (N, E)
        if self.training and labels is not None:
            self._online_refresh(h, labels, index)
        anomaly = self.anomaly_scores(h)  # (N,)
        scores = self.attention(h).float()[:, 0] + F.softplus(self.anomaly_beta) * anomaly  # (N,)
        att = segment_softmax(scores, ptr, index)  # (N,)
        embedding = weighted_segment_sum(h, att, ptr, index)[:, 0]  # (B, E)
        inst_logits = self.instance_head(h)  # (N, C)
        aux = {}
        if labels is not None:
            inst_loss = self._instance_loss(inst_logits, att, ptr, index, labels)
            aux["instance"] = self.config.instance_loss_weight * inst_loss
        return MILOutput(
            logits=self.head(embedding),
            attention=att,
            embedding=embedding,
            aux_losses=aux,
            instance_scores={"anomaly": anomaly, "logits": inst_logits},
        )

    def _online_refresh(self, h: Tensor, labels: Tensor, index: Tensor) -> None:
        control = (labels == self.config.normal_class).index_select(0, index)  # (N,)
        if int(control.sum()) < 2:
            return
        hc = h.detach()[control].float()  # (M, E)
        if not bool(torch.isfinite(hc).all()):  # NaN features: leave the statistics alone, forward reports it
            return
        self._set_stats(*_moments(hc), hc, momentum=self.config.momentum)

    def _instance_loss(self, logits: Tensor, att: Tensor, ptr: Tensor, index: Tensor, labels: Tensor) -> Tensor:
        """Single-instance CE with the bag label; attention-weighted in disease bags, uniform in control."""
        control = (labels == self.config.normal_class).index_select(0, index)  # (N,)
        sizes = ptr_to_sizes(ptr).float().index_select(0, index)  # (N,)
        weight = torch.where(control, torch.ones_like(sizes), att.detach() * sizes)  # (N,)
        return instance_cross_entropy(logits, ptr, labels, weight)

    def _resize_head(self, num_classes: int) -> None:
        if self.config.normal_class >= num_classes:
            raise InvalidArgumentError(
                f"amil: cannot shrink to {num_classes} classes, normal_class is {self.config.normal_class}"
            )
        self.head = resize_linear(self.head, num_classes)
        self.instance_head = resize_linear(self.instance_head, num_classes)
