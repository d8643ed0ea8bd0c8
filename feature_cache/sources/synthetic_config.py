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
- ``confounds``: planted label confounds (a shortcut a model can learn instead of the morphology):
  ``site:0.8`` sends 80% of the patients of class k to site ``k % sites`` (the others keep their
  random site); ``date:0.8`` acquires 80% of class k's patients in the k-th of C equal periods of
  the year. Drawn from a stream of their own, so a cohort without confounds is unchanged.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from feature_cache.config import Config, option
from feature_cache.errors import InvalidArgumentError
from feature_cache.sources.synthetic_vocab import TASKS

BIAS_COLUMNS = ("sex", "age", "site")
CONFOUND_COLUMNS = ("site", "date")
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
class Confound:
    """A planted label confound: a non-morphological column that follows the diagnosis.

    Attributes:
        column: ``site`` or ``date``.
        strength: probability that a patient's column value is set by its class (0 = none, 1 = always).
    """

    column: str
    strength: float

    def __str__(self) -> str:
        return f"{self.column}:{self.strength:g}"


def parse_confound(text: str) -> Confound:
    """Parse ``COLUMN:STRENGTH`` (``site:0.8``, ``date:1``).

    Raises:
        InvalidArgumentError: malformed text, unknown column, or a strength outside [0, 1].
    """
    col, sep, value = text.strip().partition(":")
    if not sep:
        raise InvalidArgumentError(f"confound {text!r}: expected COLUMN:STRENGTH, e.g. site:0.8")
    if col not in CONFOUND_COLUMNS:
        raise InvalidArgumentError(f"confound {text!r}: unknown column {col!r} (choose from "
                                   f"{', '.join(CONFOUND_COLUMNS)})")  # fmt: skip
    try:
        strength = float(value)
    except ValueError:
        raise InvalidArgumentError(f"confound {text!r}: strength {value!r} is not a number") from None
    if not 0.0 <= strength <= 1.0:
        raise InvalidArgumentError(f"confound {text!r}: strength must be in [0, 1]")
    return Confound(col, strength)


def _load_confounds(value: object) -> object:
    if isinstance(value, (list, tuple)):
        return tuple(parse_confound(c) if isinstance(c, str) else c for c in value)
    return value


def _load_biases(value: object) -> object:
    """Biases as :class:`Bias` objects or their text form (``sex=F:0.5``), as ``to_dict`` writes them."""
    if isinstance(value, (list, tuple)):
        return tuple(parse_bias(b) if isinstance(b, str) else b for b in value)
    return value


@dataclass(frozen=True)
class SynthConfig(Config):
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
        biases: planted subgroup effects (``sex=F:0.5`` in a file).
        folds: number of stratified folds in the split hints.
        confounds: planted label confounds (``site:0.8`` in a file); left out of :meth:`to_dict` when
            empty, so cohorts without one keep the configuration text of cohorts written before it existed.
    """

    config_key = "synthetic option"

    task: str = option("aml", choices=TASKS)
    patients: int = option(60, low=1)
    seed: int = option(0, low=0)
    crop_size: int = option(96, low=32)
    bag_median: int = option(300, low=1)
    bag_sigma: float = option(0.75, low=0)
    bag_range: tuple[int, int] = option((10, 2000), low=1)
    witness_median: float = option(0.06, low=0, high=1, low_open=True)
    witness_sigma: float = option(0.7, low=0)
    witness_range: tuple[float, float] = option((0.01, 0.5), low=0, high=1, low_open=True)
    subtlety: float = option(0.0, low=0, high=1)
    background_concentration: float = option(40.0, low=0, low_open=True)
    confounder_scale: float = option(1.0, low=0)
    sites: int = option(1, low=1)
    site_strength: float = option(1.0, low=0)
    biases: tuple[Bias, ...] = option((), load=_load_biases, dump=lambda biases: [str(b) for b in biases])
    folds: int = option(5, low=2)
    confounds: tuple[Confound, ...] = option((), load=_load_confounds, dump=lambda cs: [str(c) for c in cs])

    def validate(self) -> None:
        """Ranges are ordered and hold their medians; planted site biases name existing sites."""
        lo, hi = self.bag_range
        if lo > hi:
            raise InvalidArgumentError(f"bag_range {list(self.bag_range)} is empty")
        if not lo <= self.bag_median <= hi:
            raise InvalidArgumentError(f"bag_median {self.bag_median} outside bag_range {list(self.bag_range)}")
        lo, hi = self.witness_range
        if lo > hi:
            raise InvalidArgumentError(f"witness_range {list(self.witness_range)} is empty")
        if not lo <= self.witness_median <= hi:
            raise InvalidArgumentError(
                f"witness_median {self.witness_median} outside witness_range {list(self.witness_range)}"
            )
        for bias in self.biases:
            if bias.column == "site" and int(bias.value) >= self.sites:
                raise InvalidArgumentError(f"bias {bias}: site {bias.value} does not exist (sites: {self.sites})")
        columns = [c.column for c in self.confounds]
        if len(set(columns)) < len(columns):
            raise InvalidArgumentError(f"confounds {[str(c) for c in self.confounds]}: one confound per column")
        if "site" in columns and self.sites < 2:
            raise InvalidArgumentError("confound site: needs at least 2 sites (--sites)")

    def to_dict(self) -> dict:
        """The fields as a plain mapping; ``confounds`` only when there is one (see the class docstring)."""
        out = super().to_dict()
        if not self.confounds:
            del out["confounds"]
        return out
