"""Peer implementations (torchmil) behind milcore's aggregator contract, for side-by-side benchmarks.

torchmil's models are binary (one logit per bag) and take dense ``(B, N_max, D)`` batches with a mask.
:class:`TorchmilAggregator` wraps one of them so that the same trainer, batches, splits and loss train it:
``forward(x, ptr, coords, labels) -> MILOutput``. Adaptation to ``C`` classes:

- binary tasks (``C == 2``) keep torchmil's model unchanged; its logit ``z`` becomes the logits ``[0, z]``
  (``softmax([0, z]) = sigmoid(z)``);
- ABMIL, TransMIL, CLAM-SB and DTFD-MIL with ``C > 2`` replace only their final linear classifier(s) by
  ``C``-way ones (DTFD-MIL: both tiers' classifiers);
- DSMIL with ``C > 2`` is one-vs-rest: ``C`` unchanged binary DSMIL models, their scores stacked.

DSMIL trains on its bag-classifier logit plus its max-instance loss (as torchmil's ``compute_loss``) and
predicts ``(bag + max instance) / 2`` (as its ``predict``). TransMIL takes no mask in torchmil, so bags go
through it one at a time (padding would feed zero rows to its attention). CLAM-SB gets the reference's
embedding layer as its ``feat_ext`` (torchmil's default, none, leaves its instance loss unconnected to the
attention and the bag classifier: ABMIL plus dead weight), and adds its instance loss
(``compute_inst_loss``: smooth top-1 SVM on the top/bottom ``k_sample`` cells, classifier 0 for label-0
bags and 1 for the others, as torchmil defines it) with weight 1 as its ``compute_loss`` does, averaged
over bags (torchmil sums it over the batch, which would weigh it by the batch size) and given the padding
mask (torchmil's ``compute_loss`` omits it, so top/bottom-k could pick padding). DTFD-MIL runs one bag at a
time (torchmil splits the padded length into pseudo-bags, so a short bag in a padded batch gets
pseudo-bags of padding only, whose attention is NaN) with ``distill_mode="afs"`` (our default; torchmil's
``"maxmin"`` passes every cell of a pseudo-bag on, twice) and adds its pseudo-bag loss with weight 1 (its
``compute_loss``); like the reference it also splits at random at inference, so its predictions vary
from one call to the next (ours split deterministically at inference). Attention: ABMIL's and CLAM's
are softmaxed within each bag; DSMIL's is its (already normalised) critical-instance attention, one
column per class in one-vs-rest; TransMIL's is the class token's last-layer attention averaged over heads,
renormalised; DTFD-MIL's is the softmax within the bag of its instance Grad-CAM score for the predicted
class (torchmil's ``predict``), so it ranks the cells as torchmil does.
"""

from __future__ import annotations

import importlib
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from milcore.bench import PEER_MODELS
from milcore.models.output import MILOutput
from milcore.ops import to_padded

#: Width of the embedding layer given to torchmil's CLAM-SB (our ``clam_sb``'s default ``embed_dim``).
CLAM_EMBED_DIM = 256


def import_torchmil() -> Any | None:
    """``torchmil.models`` or ``None`` when torchmil is not installed (or fails to import)."""
    try:
        return importlib.import_module("torchmil.models")
    except Exception:  # ImportError, or a broken install: the rows say 'not installed'
        return None


def build_torchmil(tm: Any, name: str, in_dim: int) -> nn.Module:
    """torchmil's binary model ``name``, configured like our aggregator of the same name.

    ABMIL: gated attention, attention dim 128, no embedding layer (Ilse et al.). TransMIL: torchmil's
    defaults (512 wide, 4 heads, Nystrom with 256 landmarks). DSMIL: attention dim 128, non-linear query.
    CLAM-SB: ``Linear -> ReLU`` embedding of width 256 as ``feat_ext`` (the reference's ``fc`` layer at our
    CLAM's width: without it torchmil's instance loss sees raw features and never reaches the attention
    or the bag classifier), gated attention, attention dim 128, ``k_sample`` 8 (CLAM's), smooth top-1
    SVM instance loss.
    DTFD-MIL: attention dim 128, 4 pseudo-bags, ``"afs"`` distillation (our defaults).
    """
    if name == "abmil":
        return tm.ABMIL(in_shape=(in_dim,), att_dim=128, gated=True)
    if name == "transmil":
        return tm.TransMIL(in_shape=(in_dim,))
    if name == "dsmil":
        return tm.DSMIL(in_shape=(in_dim,), att_dim=128, nonlinear_q=True)
    if name == "clam_sb":
        embed = nn.Sequential(nn.Linear(in_dim, CLAM_EMBED_DIM), nn.ReLU())  # the reference's fc layer
        model = tm.CLAM_SB(in_shape=(in_dim,), att_dim=128, gated=True, k_sample=8, feat_ext=embed)
        model.inst_loss_fn = SmoothTop1SVM()  # torchmil 1.0.2's mixes rows and fails on confident ones
        return model
    if name == "dtfd":
        return tm.DTFDMIL(in_shape=(in_dim,), att_dim=128, n_groups=4, distill_mode="afs")
    raise ValueError(f"no torchmil adapter for {name!r} (available: {', '.join(PEER_MODELS)})")


class SmoothTop1SVM(nn.Module):
    """Smooth top-1 SVM loss (Berrada, Zisserman, Kumar, ICLR 2018), CLAM's default instance loss, row by row.

    Per row with scores ``x (C,)`` and target ``y``: ``m = x + [c != y] - x_y``; the loss is ``max(m)``
    where the top score leads the next by at least ``tau * log(thresh)`` (the reference's switch to the
    hard loss) and ``tau * logsumexp(m / tau)`` elsewhere, averaged over rows. Written here because
    torchmil 1.0.2's ``SmoothTop1SVM``, called as its CLAM calls it (targets ``(n, 1)``), broadcasts every
    target against every row (``(n, n, C)``: a wrong loss) and raises once more than two rows are confident,
    which stops a CLAM-SB fit after a few epochs; the ``topk`` package of the reference is not a dependency.

    Args:
        alpha: margin.
        tau: temperature.
        thresh: switch to the hard loss where the top-2 gap is at least ``tau * log(thresh)``.
    """

    def __init__(self, alpha: float = 1.0, tau: float = 1.0, thresh: float = 1e3) -> None:
        super().__init__()
        self.alpha, self.tau, self.thresh = alpha, tau, thresh

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean loss of scores ``x (n, C)`` against targets ``y`` (``(n,)`` or ``(n, 1)``)."""
        x = x.float()
        y = y.long().view(-1, 1)  # (n, 1)
        classes = torch.arange(x.shape[1], device=x.device)
        margin = x + self.alpha * (classes[None, :] != y).float() - x.gather(1, y)  # (n, C)
        top = x.detach().topk(2, dim=1).values  # (n, 2)
        hard = (top[:, 0] - top[:, 1]) >= self.tau * float(np.log(self.thresh))  # (n,)
        smooth = self.tau * torch.logsumexp(margin / self.tau, dim=1)  # (n,)
        return torch.where(hard, margin.amax(dim=1), smooth).mean()


def _masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.softmax(scores.float().masked_fill(~mask, float("-inf")), dim=1).nan_to_num(0.0)


class TorchmilAggregator(nn.Module):
    """A torchmil model trained and evaluated through milcore's aggregator contract.

    Args:
        name: ``abmil``, ``transmil``, ``dsmil``, ``clam_sb`` or ``dtfd``.
        in_dim: feature dimension.
        num_classes: number of classes (>= 2).
        tm: the ``torchmil.models`` module (imported when ``None``).
    """

    has_padded_path = False
    hook_requirements: frozenset[str] = frozenset()

    def __init__(self, name: str, in_dim: int, num_classes: int, tm: Any | None = None) -> None:
        super().__init__()
        tm = tm if tm is not None else import_torchmil()
        if tm is None:
            raise ImportError("torchmil is not installed (pip install 'milcore[peers]')")
        if name not in PEER_MODELS:
            raise ValueError(f"no torchmil adapter for {name!r} (available: {', '.join(PEER_MODELS)})")
        self.name, self.num_classes, self.binary = name, num_classes, num_classes == 2
        self.config = None
        copies = 1 if self.binary or name != "dsmil" else num_classes  # DSMIL: one-vs-rest
        self.peers = nn.ModuleList(build_torchmil(tm, name, in_dim) for _ in range(copies))
        if not self.binary and name != "dsmil":
            for attr in ("classifier", "u_classifier") if name == "dtfd" else ("classifier",):
                head = getattr(self.peers[0], attr)
                head = getattr(head, "module", head)  # torchmil's LazyLinear wraps an nn.Linear
                setattr(self.peers[0], attr, nn.Linear(head.in_features, num_classes))

    def on_epoch_start(self, ctx: Any) -> None:
        """No epoch hooks (the trainer's generic call)."""

    def _to_logits(self, z: torch.Tensor) -> torch.Tensor:
        """(B,) binary logit -> (B, 2); (B, C) stays."""
        return torch.stack([torch.zeros_like(z), z], dim=1) if z.ndim == 1 else z

    def forward(self, x: torch.Tensor, ptr: torch.Tensor, coords: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> MILOutput:  # fmt: skip
        """Bag logits (B, C) and per-row attention for the bags ``ptr`` cuts from ``x`` (N, D)."""
        if self.name == "transmil":
            return self._forward_per_bag(x, ptr)
        if self.name == "dtfd":
            return self._forward_dtfd(x, ptr, labels)
        dense, mask = to_padded(x, ptr)  # (B, N_max, D), (B, N_max)
        if self.name in ("abmil", "clam_sb"):
            model = self.peers[0]
            if self.name == "abmil":
                z, att = model(dense, mask, return_att=True)  # (B,) or (B, C); (B, N_max) pre-softmax
            else:
                z, att, emb = model(dense, mask, return_att=True, return_emb=True)  # emb (B, N_max, D)
            attention = _masked_softmax(att, mask)[mask]  # (N,)
            logits = self._to_logits(z)
            aux = {}
            if self.name == "clam_sb" and labels is not None:  # its compute_loss, with the mask, per bag
                aux["instance"] = model.compute_inst_loss(att, emb, labels, mask) / max(len(labels), 1)
            return MILOutput(logits, attention, logits.detach().float(), aux)
        bag, inst, atts = [], [], []
        aux: dict[str, torch.Tensor] = {}
        for peer in self.peers:  # DSMIL: one model (binary) or one per class (one-vs-rest)
            y_bag, att, y_inst = peer(dense, mask, return_att=True, return_inst_pred=True)  # (B,), (B,N,1), (B,N)
            y_max = y_inst.float().masked_fill(~mask, float("-inf")).amax(dim=1)  # (B,)
            bag.append(y_bag.float() if self.training else 0.5 * (y_bag.float() + y_max))
            inst.append(y_max)
            atts.append(att.squeeze(-1)[mask])  # (N,)
        if self.binary:
            logits = self._to_logits(bag[0])
            inst_logits = inst[0][:, None]
        else:
            logits = torch.stack(bag, dim=1)  # (B, C)
            inst_logits = torch.stack(inst, dim=1)  # (B, C)
        if labels is not None:
            target = labels[:, None] == 1 if self.binary else F.one_hot(labels, self.num_classes).bool()
            aux["max_instance"] = F.binary_cross_entropy_with_logits(inst_logits, target.float())
        attention = atts[0] if len(atts) == 1 else torch.stack(atts, dim=1)  # (N,) or (N, C)
        return MILOutput(logits, attention.float(), logits.detach().float(), aux)

    def _forward_dtfd(self, x: torch.Tensor, ptr: torch.Tensor, labels: torch.Tensor | None) -> MILOutput:
        """torchmil's DTFD-MIL one bag at a time: tier-2 logits, tier-1 pseudo-bag loss, Grad-CAM attention."""
        model = self.peers[0]
        np.random.seed(int(torch.randint(0, 2**31 - 1, (1,))))  # torchmil shuffles with numpy: tie it to torch's seed
        logits, atts, tier1 = [], [], []
        for b in range(len(ptr) - 1):
            bag = x[ptr[b] : ptr[b + 1]].unsqueeze(0)  # (1, n, D)
            z, pseudo = model(bag, return_pseudo_pred=True)  # (1,) | (1, C); (1, G) | (1, G * C)
            logit = self._to_logits(z.reshape(1, -1).squeeze(-1) if self.binary else z.reshape(1, -1))  # (1, C)
            if labels is not None:
                y = labels[b : b + 1]
                if self.binary:
                    tier1.append(F.binary_cross_entropy_with_logits(pseudo.float(), y.float().expand_as(pseudo)))
                else:
                    groups = pseudo.reshape(-1, self.num_classes)  # (G, C)
                    tier1.append(F.cross_entropy(groups.float(), y.expand(groups.shape[0])))
            with torch.no_grad():  # torchmil's _cam_1d (its return_inst_cam fails for C > 2 on uneven pseudo-bags)
                weight = list(model.classifier.parameters())[-2]  # (1 | C, D) tier-1 classifier weight
                cam = bag[0].float() @ weight.float().T  # (n, 1 | C)
                cls = 0 if cam.shape[1] == 1 else int(logit.argmax(1))
                atts.append(torch.softmax(cam[:, cls], dim=0))  # (n,)
            logits.append(logit)
        out = torch.cat(logits)  # (B, C)
        aux = {"tier1": torch.stack(tier1).mean()} if tier1 else {}
        return MILOutput(out, torch.cat(atts).float(), out.detach().float(), aux)

    def _forward_per_bag(self, x: torch.Tensor, ptr: torch.Tensor) -> MILOutput:
        model = self.peers[0]
        logits, atts = [], []
        for b in range(len(ptr) - 1):
            bag = x[ptr[b] : ptr[b + 1]].unsqueeze(0)  # (1, n, D)
            if self.training:
                z = model(bag)
                att = torch.full((bag.shape[1],), 1.0 / max(bag.shape[1], 1), device=x.device)
            else:
                z, a = model(bag, return_att=True)  # (1,) or (1, C); (1, n)
                a = a[0].float().clamp_min(0)
                att = a / a.sum().clamp_min(1e-12)
            logits.append(self._to_logits(z.reshape(1, -1).squeeze(-1) if self.binary else z.reshape(1, -1)))
            atts.append(att)
        out = torch.cat(logits)  # (B, C)
        return MILOutput(out, torch.cat(atts).float(), out.detach().float())
