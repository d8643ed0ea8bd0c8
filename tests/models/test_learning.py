"""Learning check: the attention aggregators find 5% witness cells; mean pooling does not.

Synthetic bank, built in memory with fixed seeds: 16-d cell features ~ N(0, I) plus a per-bag offset
~ N(0, 0.5^2 I) (patient/site effect); a class-c bag (c >= 1) has 5% witness cells shifted by 6 along
a fixed direction of class c; class 0 (control) bags have none. Three classes, 240 training bags of
40-80 cells, 150 test bags. Mean pooling only sees the witness shift diluted 20x under the bag offset,
so it stays near chance, while attention models pick the witnesses out.

Attention instance-AUROC: planted cells vs the other cells of the disease bags, scored by attention x
bag size (so that bags of different sizes are comparable); DSMIL (one column per class) uses the column
of the bag's class. Robustness was checked over 4 data seeds before fixing these (see the report).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sklearn.metrics import balanced_accuracy_score, roc_auc_score

from milcore.models import EpochContext, MILAggregator, create_aggregator, list_aggregators
from milcore.ops import ptr_to_index

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")

D = 16
SMALL = {"transmil": {"dim": 64, "num_heads": 4}}


def make_bags(num_bags: int, seed: int, classes: tuple[int, ...] = (0, 1, 2)) -> tuple[torch.Tensor, ...]:
    """``x (N, D)``, ``ptr (B+1,)``, ``labels (B,)``, ``witness (N,)`` bool."""
    g = torch.Generator().manual_seed(seed)
    directions = torch.linalg.qr(torch.randn(D, D, generator=torch.Generator().manual_seed(123)))[0].T[:4]
    xs, labels, witness, sizes = [], [], [], []
    for i in range(num_bags):
        n = int(torch.randint(40, 81, (1,), generator=g))
        label = classes[i % len(classes)]
        x = torch.randn(n, D, generator=g) + 0.5 * torch.randn(1, D, generator=g)
        w = torch.zeros(n, dtype=torch.bool)
        if label > 0:
            rows = torch.randperm(n, generator=g)[: max(1, round(0.05 * n))]
            x[rows] += 6.0 * directions[label - 1]
            w[rows] = True
        xs.append(x), labels.append(label), witness.append(w), sizes.append(n)
    ptr = torch.tensor([0, *torch.tensor(sizes).cumsum(0).tolist()])
    return torch.cat(xs), ptr, torch.tensor(labels), torch.cat(witness)


def subset(x: torch.Tensor, ptr: torch.Tensor, bags: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows = torch.cat([torch.arange(int(ptr[b]), int(ptr[b + 1])) for b in bags])
    return x[rows], F.pad((ptr[bags + 1] - ptr[bags]).cumsum(0), (1, 0))


def train(model: MILAggregator, x, ptr, labels, epochs: int = 12, control=None) -> MILAggregator:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    for epoch in range(epochs):
        model.on_epoch_start(EpochContext(epoch, control_instances=control))
        model.train()
        order = torch.randperm(len(labels), generator=g)
        for start in range(0, len(labels), 8):
            bags = order[start : start + 8]
            xb, pb = subset(x, ptr, bags)
            out = model(xb, pb, labels=labels[bags])
            loss = F.cross_entropy(out.logits, labels[bags]) + sum(out.aux_losses.values())
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def scores(model: MILAggregator, x, ptr, labels, witness) -> tuple[float, float]:
    """Bag balanced accuracy and attention instance-AUROC on the disease bags."""
    with torch.no_grad():
        out = model(x, ptr)
    ba = balanced_accuracy_score(labels.numpy(), out.logits.argmax(1).numpy())
    index = ptr_to_index(ptr, x.shape[0])
    att = out.attention
    if att.dim() == 2:
        att = att[torch.arange(att.shape[0]), labels[index]]
    att = att * (ptr[1:] - ptr[:-1]).float()[index]
    disease = labels[index] > 0
    return ba, roc_auc_score(witness[disease].numpy(), att[disease].numpy())


@pytest.fixture(scope="module")
def bank() -> dict[str, tuple[torch.Tensor, ...]]:
    return {"train": make_bags(240, seed=0), "test": make_bags(150, seed=10)}


@pytest.fixture(scope="module")
def mean_ba(bank) -> float:
    torch.manual_seed(0)
    model = train(create_aggregator("mean", in_dim=D, num_classes=3, embed_dim=64), *bank["train"][:3])
    ba, _ = scores(model, *bank["test"])
    return ba


def test_mean_pooling_stays_near_chance(mean_ba: float) -> None:
    assert mean_ba <= 0.7, f"mean pooling should not solve the witness task, got BA {mean_ba:.3f}"


#: every registered aggregator but the mean-pooling baseline must learn the witness task
LEARNERS = [n for n in list_aggregators() if n != "mean"]
#: the aggregators added by issue 18, whose target is balanced accuracy and attention instance-AUROC
#: >= 0.95 on this check; their full check is in the slow tier (5-40 s each on the 2-core machine), a
#: short training run per model stays in the default tier (test_new_aggregators_train)
NEW = ("acmil", "clam_mb", "clam_sb", "dtfd", "ilra", "rrt", "wikg")
#: max pooling's "attention" is the share of embedding dims whose max a cell attains, a blunter witness
#: score: its instance-AUROC was 0.836-0.864 over 4 data seeds (BA 0.987-0.993), so its floor is 0.8
AUROC_FLOOR = {"max": 0.8, **dict.fromkeys(NEW, 0.95)}
BA_FLOOR = dict.fromkeys(NEW, 0.95)


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in NEW else n for n in LEARNERS])
def test_attention_models_find_the_witnesses(name: str, bank, mean_ba: float) -> None:
    torch.manual_seed(0)
    overrides = SMALL.get(name, {"embed_dim": 64})
    model = create_aggregator(name, in_dim=D, num_classes=3, **overrides)
    x, ptr, labels, _ = bank["train"]
    control = make_control_sampler(x, ptr, labels)
    ba, auroc = scores(train(model, x, ptr, labels, control=control), *bank["test"])
    ba_floor = BA_FLOOR.get(name, 0.9)
    assert ba >= ba_floor, f"{name}: bag balanced accuracy {ba:.3f} < {ba_floor}"
    floor = AUROC_FLOOR.get(name, 0.85)
    assert auroc >= floor, f"{name}: attention instance-AUROC {auroc:.3f} < {floor}"
    assert ba >= mean_ba + 0.2, f"{name}: BA {ba:.3f} not clearly above mean pooling's {mean_ba:.3f}"


@pytest.mark.parametrize("name", NEW)
def test_new_aggregators_train(name: str) -> None:
    """Default-tier stand-in for the slow check: 36 steps on 48 witness bags cut the loss by >= 30%, with
    the model's own auxiliary losses finite at every step."""
    x, ptr, labels, _ = make_bags(48, seed=5)
    torch.manual_seed(0)
    model = create_aggregator(name, in_dim=D, num_classes=3, **SMALL.get(name, {"embed_dim": 32}))
    with torch.no_grad():
        before = float(F.cross_entropy(model.eval()(x, ptr).logits, labels))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(6):
        model.train()
        for bags in torch.randperm(len(labels), generator=g).split(8):
            out = model(*subset(x, ptr, bags), labels=labels[bags])
            assert all(torch.isfinite(v) for v in out.aux_losses.values()), out.aux_losses
            loss = F.cross_entropy(out.logits, labels[bags]) + sum(out.aux_losses.values())
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        after = float(F.cross_entropy(model.eval()(x, ptr).logits, labels))
    assert after < 0.7 * before, f"{name}: training loss {before:.3f} -> {after:.3f}"


def make_control_sampler(x: torch.Tensor, ptr: torch.Tensor, labels: torch.Tensor):
    """What a trainer hands AMiL's hook: the cells of the control (label 0) training bags."""
    rows = torch.cat([torch.arange(int(ptr[b]), int(ptr[b + 1])) for b in range(len(labels)) if labels[b] == 0])
    return lambda: x[rows]


def test_amil_flags_cells_of_a_class_never_seen_in_training() -> None:
    """Trained on control vs class 1 only; test bags carry 5% cells of class 3 (another direction)."""
    x, ptr, labels, _ = make_bags(160, seed=1, classes=(0, 1))
    torch.manual_seed(0)
    model = create_aggregator("amil", in_dim=D, num_classes=2, embed_dim=64)
    with torch.no_grad():
        before = model(x[:10], torch.tensor([0, 10])).instance_scores["anomaly"]
    assert torch.equal(before, torch.zeros(10)), "an unfitted AMiL has no anomaly scores"
    model = train(model, x, ptr, labels, control=make_control_sampler(x, ptr, labels))
    assert bool(model.fitted)
    xt, pt, yt, wt = make_bags(100, seed=11, classes=(0, 3))
    with torch.no_grad():
        out = model(xt, pt)
    index = ptr_to_index(pt, xt.shape[0])
    unseen_bags = yt[index] == 3
    anomaly_auroc = roc_auc_score(wt.numpy(), out.instance_scores["anomaly"].numpy())
    att = out.attention * (pt[1:] - pt[:-1]).float()[index]
    attention_auroc = roc_auc_score(wt[unseen_bags].numpy(), att[unseen_bags].numpy())
    assert anomaly_auroc >= 0.95, f"anomaly AUROC for unseen-class cells {anomaly_auroc:.3f}"
    assert attention_auroc >= 0.8, f"attention AUROC for unseen-class cells {attention_auroc:.3f}"
