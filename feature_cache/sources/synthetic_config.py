"""Configuration of the synthetic cohort: sizes, difficulty knobs, sites and planted biases.

Difficulty knobs (all in :class:`SynthConfig`):

- ``witness_median`` / ``witness_sigma``: per-patient fraction of diagnostic cells, log-normal
  around the median (default 6%, clipped to ``witness_range``). Lower = harder: mean pooling
  drowns, attention must find the few witnesses.
- ``subtlety``: 0..1, how far abnormal cells move toward the normal cell type they mimic
  (myeloblast -> lymphocyte, spherocyte -> discocyte, ...). Higher = harder for every model.
- ``background_concentration``: Dirichlet concentration of each patient's normal differential
  (lower = patients differ more in their normal cells, which hurts mean pooling most).
- ``confounder_scale``: scales the rate of look-alike, non-diagnostic cells (reactive
  lymphocytes, occasional poikilocytes) that every patient may carry.
- ``sites`` / ``site_strength``: number of acquisition sites and how strongly each shifts stain,
  illumination and focus (site 0 is the reference).
- ``bag_median`` / ``bag_sigma`` / ``bag_range``: heavy-tailed (log-normal) number of cells per patient.
- ``biases``: planted subgroup effects, e.g. ``sex=F:0.5`` halves the diagnostic-cell rate of
  female patients; ``age=72-86:subtle=0.5`` makes their abnormal cells subtler.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from feature_cache.errors import InvalidArgumentError
from feature_cache.sources.synthetic_vocab import TASKS

BIAS_COLUMNS = ("sex", "age", "site")
SEX_CODES = ("F", "M")


@dataclass(frozen=True)
class Bias:
    """A planted subgroup effect.

    Attributes:
        column: ``sex``, ``age`` or ``site``.
        value: the subgroup: ``"F"``/``"M"``, an age range ``"72-86"`` (inclusive), or a site index.
        factor: for ``kind="rate"``, multiplies the subgroup's diagnostic-cell rate; for
            ``kind="subtle"``, is added to the subgroup's subtlety (clipped to 1).
        kind: ``"rate"`` or ``"subtle"``.
    """

    column: str
    value: str
    factor: float
    kind: str = "rate"

    def matches(self, sex: str, age: int, site: int) -> bool:
        """Whether a patient with these attributes belongs to the subgroup."""
        if self.column == "sex":
            return sex == self.value
        if self.column == "site":
            return str(site) == self.value
        lo, hi = (int(v) for v in self.value.split("-"))
        return lo <= age <= hi

    def __str__(self) -> str:
        suffix = f"{self.factor:g}" if self.kind == "rate" else f"subtle={self.factor:g}"
        return f"{self.column}={self.value}:{suffix}"


_BIAS_RE = re.compile(r"^(?P<col>\w+)=(?P<val>[^:]+):(?:(?P<kind>rate|subtle)=)?(?P<factor>[-+0-9.eE]+)$")


def parse_bias(text: str) -> Bias:
    """Parse ``COLUMN=VALUE:FACTOR`` (rate) or ``COLUMN=VALUE:subtle=AMOUNT``.

    Examples: ``sex=F:0.5``, ``age=72-86:0.3``, ``site=2:subtle=0.4``.

    Raises:
        InvalidArgumentError: on a malformed text, unknown column, bad sex code or bad factor.
    """
    m = _BIAS_RE.match(text.strip())
    if not m:
        raise InvalidArgumentError(
            f"bias {text!r}: expected COLUMN=VALUE:FACTOR or COLUMN=VALUE:subtle=AMOUNT, e.g. sex=F:0.5"
        )
    col, val, kind = m["col"], m["val"].strip(), m["kind"] or "rate"
    try:
        factor = float(m["factor"])
    except ValueError as exc:
        raise InvalidArgumentError(f"bias {text!r}: factor {m['factor']!r} is not a number") from exc
    if col not in BIAS_COLUMNS:
        raise InvalidArgumentError(f"bias {text!r}: unknown column {col!r} (choose from {', '.join(BIAS_COLUMNS)})")
    if col == "sex":
        val = val.upper()
        if val not in SEX_CODES:
            raise InvalidArgumentError(f"bias {text!r}: sex must be F or M")
    elif col == "age":
        if not re.fullmatch(r"\d+-\d+", val) or int(val.split("-")[0]) > int(val.split("-")[1]):
            raise InvalidArgumentError(f"bias {text!r}: age must be a range LOW-HIGH, e.g. 72-86")
    elif not val.isdigit():
        raise InvalidArgumentError(f"bias {text!r}: site must be a site index (0, 1, ...)")
    if kind == "rate" and factor < 0:
        raise InvalidArgumentError(f"bias {text!r}: a rate factor must be >= 0")
    if kind == "subtle" and not 0 <= factor <= 1:
        raise InvalidArgumentError(f"bias {text!r}: a subtlety amount must be in [0, 1]")
    return Bias(col, val, factor, kind)


@dataclass(frozen=True)
class SynthConfig:
    """Everything that defines a synthetic cohort; equal configs give byte-identical cohorts.

    Attributes:
        task: ``aml``, ``all`` or ``anemia``.
        patients: number of patients (classes balanced).
        seed: random seed.
        crop_size: side of each crop in pixels.
        bag_median: median cells per patient.
        bag_sigma: log-normal sigma of the bag size (heavy tail).
        bag_range: smallest and largest bag.
        witness_median: median fraction of diagnostic cells in a diseased patient.
        witness_sigma: log-normal sigma of that fraction across patients.
        witness_range: clip range of that fraction.
        subtlety: 0..1, abnormal cells moved toward the normal cells they mimic.
        background_concentration: Dirichlet concentration of each patient's normal differential.
        confounder_scale: multiplies the task's look-alike confounder rate.
        sites: number of acquisition sites.
        site_strength: how strongly sites differ (0 = identical).
        biases: planted subgroup effects.
        folds: number of stratified folds in the split hints.
    """

    task: str = "aml"
    patients: int = 60
    seed: int = 0
    crop_size: int = 96
    bag_median: int = 300
    bag_sigma: float = 0.75
    bag_range: tuple[int, int] = (10, 2000)
    witness_median: float = 0.06
    witness_sigma: float = 0.7
    witness_range: tuple[float, float] = (0.01, 0.5)
    subtlety: float = 0.0
    background_concentration: float = 40.0
    confounder_scale: float = 1.0
    sites: int = 1
    site_strength: float = 1.0
    biases: tuple[Bias, ...] = field(default_factory=tuple)
    folds: int = 5

    def __post_init__(self) -> None:
        """Validate every value; raises :class:`InvalidArgumentError` naming the bad one."""
        if self.task not in TASKS:
            raise InvalidArgumentError(f"unknown task {self.task!r} (choose from {', '.join(TASKS)})")
        checks = [
            (self.patients >= 1, f"patients must be >= 1, got {self.patients}"),
            (self.crop_size >= 32, f"crop size must be >= 32, got {self.crop_size}"),
            (self.bag_range[0] >= 1, f"smallest bag must be >= 1, got {self.bag_range[0]}"),
            (self.bag_range[0] <= self.bag_range[1], f"bag range {self.bag_range} is empty"),
            (self.bag_range[0] <= self.bag_median <= self.bag_range[1],
             f"bag median {self.bag_median} outside bag range {self.bag_range}"),
            (self.bag_sigma >= 0, f"bag sigma must be >= 0, got {self.bag_sigma}"),
            (0 < self.witness_range[0] <= self.witness_range[1] <= 1,
             f"witness range {self.witness_range} must lie in (0, 1]"),
            (self.witness_range[0] <= self.witness_median <= self.witness_range[1],
             f"witness median {self.witness_median} outside witness range {self.witness_range}"),
            (self.witness_sigma >= 0, f"witness sigma must be >= 0, got {self.witness_sigma}"),
            (0 <= self.subtlety <= 1, f"subtlety must be in [0, 1], got {self.subtlety}"),
            (self.background_concentration > 0, "background concentration must be > 0"),
            (self.confounder_scale >= 0, f"confounder scale must be >= 0, got {self.confounder_scale}"),
            (self.sites >= 1, f"sites must be >= 1, got {self.sites}"),
            (self.site_strength >= 0, f"site strength must be >= 0, got {self.site_strength}"),
            (self.folds >= 2, f"folds must be >= 2, got {self.folds}"),
            (self.seed >= 0, f"seed must be >= 0, got {self.seed}"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidArgumentError(message)
        for bias in self.biases:
            if bias.column == "site" and int(bias.value) >= self.sites:
                raise InvalidArgumentError(f"bias {bias}: site {bias.value} does not exist (sites: {self.sites})")

    def to_dict(self) -> dict:
        """A JSON-ready description (biases as their text form)."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["biases"] = [str(b) for b in self.biases]
        out["bag_range"] = list(self.bag_range)
        out["witness_range"] = list(self.witness_range)
        return out
