"""Ground truth drawn by the synthetic renderer: WBCAtt-style attributes and diagnostic-feature masks.

While a crop is painted, :class:`CellTruth` records what was actually drawn (after the subtlety
blend): the numbers (cell radius, N:C ratio, chromatin density and coarseness, nucleoli, vacuoles,
granules, Auer rods, cytoplasm colour and texture, ...) and the masks of the cell body, nucleus,
granules and Auer rods. Recording draws no random number, so the pixels are the same with or
without it.

The numbers become categorical attributes a hematologist reads (the 11 attributes of WBCAtt,
Tsutsui et al. 2023, plus nucleoli and Auer rods for white cells; size, shape, central pallor and
colour for red cells) by the thresholds of :func:`white_attributes` / :func:`red_attributes`; each
attribute value has a phrase for reports (``("nc_ratio", "high") -> "high N:C ratio"``).

A diagnostic cell's *diagnostic feature* (the mask a pixel explanation should point into) is the
first drawn feature in :data:`DIAGNOSTIC_FEATURES` for its type: the Auer rod of an Auer-rod
myeloblast, the rods (else the heavy granules) of an abnormal promyelocyte, the dark granules of an
abnormal eosinophil, the nucleus of a blast, the rod alone of the ``auer`` task's myeloblast (its nucleus is
that of the myeloblasts every patient of that task carries), the whole cell of an abnormal red cell.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

#: White-cell attributes (column name -> (values, phrase of each value for reports)).
WHITE_ATTRIBUTES: dict[str, dict[str, str]] = {
    "cell_size": {"small": "small cell", "big": "large cell"},
    "cell_shape": {"round": "round outline", "irregular": "irregular outline"},
    "nucleus_shape": {"round": "round nucleus", "indented": "indented nucleus", "band": "band nucleus",
                      "bilobed": "bilobed nucleus", "multilobed": "segmented (multilobed) nucleus"},
    "nc_ratio": {"low": "low N:C ratio", "high": "high N:C ratio"},
    "chromatin": {"fine": "fine chromatin", "coarse": "coarse, condensed chromatin"},
    "nucleoli": {"none": "no visible nucleoli", "visible": "visible nucleoli"},
    "cytoplasm_colour": {"pink": "pink cytoplasm", "grey_blue": "grey-blue cytoplasm",
                         "blue": "basophilic (blue) cytoplasm"},
    "cytoplasm_texture": {"clear": "clear cytoplasm", "frosted": "frosted cytoplasm"},
    "vacuoles": {"no": "no vacuoles", "yes": "cytoplasmic vacuoles"},
    "granularity": {"no": "agranular cytoplasm", "yes": "granular cytoplasm"},
    "granule_colour": {"nil": "no granules", "lilac": "lilac granules", "orange": "orange-red granules",
                       "purple": "dark purple granules"},
    "granule_type": {"nil": "no granules", "fine": "fine granules", "coarse": "coarse granules"},
    "auer_rods": {"no": "no Auer rods", "yes": "Auer rods"},
}  # fmt: skip

#: Red-cell attributes.
RED_ATTRIBUTES: dict[str, dict[str, str]] = {
    "cell_size": {"small": "microcyte", "normal": "normal-sized red cell", "big": "macrocyte"},
    "cell_shape": {"disc": "round disc", "ellipse": "elliptocyte", "sickle": "sickle shape",
                   "target": "target cell", "fragment": "fragment (schistocyte)", "teardrop": "teardrop shape"},
    "central_pallor": {"none": "no central pallor", "normal": "normal central pallor",
                       "increased": "increased central pallor"},
    "colour": {"hypochromic": "hypochromic", "normochromic": "normochromic", "hyperchromic": "hyperchromic"},
}  # fmt: skip

#: Attribute columns written to ``cells.csv`` per lineage, in order.
ATTRIBUTE_COLUMNS: dict[str, tuple[str, ...]] = {"wbc": tuple(WHITE_ATTRIBUTES), "rbc": tuple(RED_ATTRIBUTES)}

#: Diagnostic cell type -> the features that make it diagnostic, in order of preference (first drawn wins).
DIAGNOSTIC_FEATURES: dict[str, tuple[str, ...]] = {
    "myeloblast_auer": ("auer_rod", "nucleus"),
    "abnormal_promyelocyte": ("auer_rod", "granules"),
    "abnormal_eosinophil": ("granules", "nucleus"),
    "myeloblast": ("nucleus",),
    "myeloblast_rod": ("auer_rod",),
    "monoblast": ("nucleus",),
    "lymphoblast": ("nucleus",),
}
#: Mask names a :class:`CellTruth` may hold.
MASK_NAMES = ("cell", "nucleus", "granules", "auer_rod")


def phrase(attribute: str, value: str) -> str:
    """The report phrase of an attribute value (``nc_ratio=high`` -> ``high N:C ratio``); unknown pairs
    read ``attribute: value``."""
    for table in (WHITE_ATTRIBUTES, RED_ATTRIBUTES):
        if attribute in table and value in table[attribute]:
            return table[attribute][value]
    return f"{attribute.replace('_', ' ')}: {value}"


@dataclass
class CellTruth:
    """What the renderer drew for one cell.

    Attributes:
        lineage: ``"wbc"`` or ``"rbc"``.
        values: drawn numbers (radius in pixels of a 96 px crop, ratios, counts, colours).
        masks: (S, S) bool masks of the drawn parts (:data:`MASK_NAMES`), kept only when asked for.
        keep_masks: whether to keep masks.
    """

    lineage: str = "wbc"
    values: dict[str, float | str] = field(default_factory=dict)
    masks: dict[str, np.ndarray] = field(default_factory=dict)
    keep_masks: bool = True

    def add_mask(self, name: str, mask: np.ndarray) -> None:
        """Record a mask (OR-ed with an earlier one of the same name)."""
        if not self.keep_masks:
            return
        mask = np.asarray(mask, dtype=bool)
        self.masks[name] = self.masks[name] | mask if name in self.masks else mask.copy()

    def add_dots(self, name: str, size: int, ys: np.ndarray, xs: np.ndarray, dots: int = 1) -> None:
        """Record square dots of ``dots`` pixels at integer positions (as ``Canvas.dots`` paints them)."""
        if not self.keep_masks:
            return
        mask = np.zeros((size, size), dtype=bool)
        for oy in range(dots):
            for ox in range(dots):
                mask[np.clip(ys + oy, 0, size - 1), np.clip(xs + ox, 0, size - 1)] = True
        self.add_mask(name, mask)

    def attributes(self) -> dict[str, str]:
        """The categorical attributes (:data:`ATTRIBUTE_COLUMNS` of the lineage)."""
        return white_attributes(self.values) if self.lineage == "wbc" else red_attributes(self.values)

    def diagnostic_feature(self, cell_type: str) -> str | None:
        """Name of the diagnostic feature's mask for a diagnostic cell of ``cell_type`` (``None``: no mask)."""
        if self.lineage == "rbc":
            return "cell" if "cell" in self.masks else None
        for name in DIAGNOSTIC_FEATURES.get(cell_type, ()):
            if name in self.masks and self.masks[name].any():
                return name
        return None


def white_attributes(v: dict[str, float | str]) -> dict[str, str]:
    """WBCAtt-style attributes of a white cell from its drawn values (thresholds fixed here)."""
    blue = float(v["cytoplasm_b"]) - float(v["cytoplasm_r"])
    granular = float(v["granule_density"]) >= 2.0 and float(v["granules"]) > 0
    gr, gg, gb = (float(v[k]) for k in ("granule_r", "granule_g", "granule_b"))
    if not granular:
        granule_colour = granule_type = "nil"
    else:
        granule_colour = "orange" if gr > 200 and gb < 100 else ("purple" if gr + gg + gb < 300 else "lilac")
        granule_type = "coarse" if float(v["granule_size"]) >= 2 else "fine"
    return {
        "cell_size": "big" if float(v["radius"]) >= 22.0 else "small",
        "cell_shape": "irregular" if float(v["irregularity"]) >= 0.04 or float(v["elongation"]) >= 1.15 else "round",
        "nucleus_shape": str(v["nucleus_shape"]),
        "nc_ratio": "high" if float(v["nc_ratio"]) >= 0.7 else "low",
        "chromatin": "fine" if float(v["chromatin_coarseness"]) < 0.3 else "coarse",
        "nucleoli": "visible" if float(v["nucleoli"]) >= 1 else "none",
        "cytoplasm_colour": "blue" if blue >= 35 else ("grey_blue" if blue >= 5 else "pink"),
        "cytoplasm_texture": "frosted" if float(v["cytoplasm_texture"]) >= 0.06 else "clear",
        "vacuoles": "yes" if float(v["vacuoles"]) >= 1 else "no",
        "granularity": "yes" if granular else "no",
        "granule_colour": granule_colour,
        "granule_type": granule_type,
        "auer_rods": "yes" if float(v["auer_rods"]) >= 1 else "no",
    }


def red_attributes(v: dict[str, float | str]) -> dict[str, str]:
    """Attributes of a red cell from its drawn values."""
    r = float(v["radius"])
    pallor = float(v["pallor"])
    shade = float(v["rgb_sum"])
    return {
        "cell_size": "small" if r < 13.5 else ("big" if r > 18.0 else "normal"),
        "cell_shape": str(v["shape"]),
        "central_pallor": "none" if pallor < 0.15 else ("increased" if pallor > 0.5 else "normal"),
        "colour": "hypochromic" if shade > 540 else ("hyperchromic" if shade < 465 else "normochromic"),
    }
