"""Cell vocabulary and disease mixtures of the synthetic blood-smear cohort.

Each white-cell type is described by the morphology a hematologist reads (the attributes of the
WBCAtt dataset: cell size and shape, nucleus shape, N:C ratio, chromatin, nucleoli, cytoplasm
colour and texture, granules, vacuoles, Auer rods). Each red-cell type by its shape, size and
central pallor. Colours are RGB in 0..255 and imitate a May-Grünwald-Giemsa stain; sizes are in
pixels of a 96 x 96 crop (about 0.4 µm per pixel).

Tasks map patient classes to mixtures of *diagnostic* cell types, loosely following the Munich
AML cohort (control, PML::RARA, NPM1, CBFB::MYH11, RUNX1::RUNX1T1), ALL vs control, and
hereditary / acquired anemias seen on red cells. One more task, ``auer``, exists to test pixel
explanations: every patient carries myeloblasts, and some of the positive class's carry an Auer rod, the only
thing that tells them apart (its diagnostic cell, ``myeloblast_rod``, is the ``myeloblast`` spec with one rod),
so a faithful explanation of its decision has to point at the rod. In the AML task the rod comes with its
cell type (an Auer-rod myeloblast also differs from a myeloblast in its cytoplasm), and a model need not look
at it. Clinically it is the question WHO 2016 asks of MDS with excess blasts, where Auer rods alone make
MDS-EB-2.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

Range = tuple[float, float]
RGB = tuple[float, float, float]

NUCLEUS_SHAPES = ("round", "indented", "band", "bilobed", "multilobed")


@dataclass(frozen=True)
class WhiteCellSpec:
    """Morphology of one white-cell type; ranges are sampled uniformly per cell.

    Attributes:
        radius: cell radius in pixels.
        irregularity: amplitude of the boundary's wobble (0 = smooth ellipse).
        elongation: maximum aspect ratio of the cell body.
        nucleus_shape: one of :data:`NUCLEUS_SHAPES`.
        nc_ratio: nucleus radius / cell radius.
        nucleus_offset: how far the nucleus sits off-centre, as a fraction of the free space.
        chromatin_rgb: colour of dense chromatin.
        chromatin_density: 0 (pale, open) .. 1 (dark, condensed).
        chromatin_coarseness: 0 (fine, lacy) .. 1 (coarse, clumped).
        nucleoli: number of visible nucleoli.
        cytoplasm_rgb: cytoplasm colour.
        cytoplasm_texture: amplitude of cytoplasm texture.
        granule_rgb: granule colour.
        granule_size: granule size in pixels (1..3).
        granule_density: granules per 100 px² of cytoplasm.
        granules_over_nucleus: granules also cover the nucleus (basophils).
        vacuoles: number of cytoplasmic vacuoles.
        auer_rods: number of Auer rods; ``auer_bundle`` draws them as a bundle (faggot cell).
        auer_probability: probability that a cell of this type shows its Auer rods at all.
        mimic: the normal cell type this one resembles (used by the subtlety knob).
    """

    radius: Range
    irregularity: Range = (0.0, 0.03)
    elongation: Range = (1.0, 1.1)
    nucleus_shape: str = "round"
    nc_ratio: Range = (0.5, 0.6)
    nucleus_offset: Range = (0.0, 0.3)
    chromatin_rgb: RGB = (80.0, 35.0, 110.0)
    chromatin_density: Range = (0.7, 0.9)
    chromatin_coarseness: Range = (0.3, 0.6)
    nucleoli: Range = (0.0, 0.0)
    cytoplasm_rgb: RGB = (220.0, 200.0, 215.0)
    cytoplasm_texture: Range = (0.02, 0.05)
    granule_rgb: RGB = (170.0, 110.0, 170.0)
    granule_size: Range = (1.0, 1.0)
    granule_density: Range = (0.0, 0.0)
    granules_over_nucleus: bool = False
    vacuoles: Range = (0.0, 0.0)
    auer_rods: Range = (0.0, 0.0)
    auer_bundle: bool = False
    auer_probability: float = 1.0
    mimic: str | None = None


@dataclass(frozen=True)
class RedCellSpec:
    """Morphology of one red-cell type.

    Attributes:
        shape: drawing primitive: disc, ellipse, sickle, target, fragment or teardrop.
        radius: radius in pixels.
        aspect: aspect ratio (long / short axis).
        pallor: radius of the central pallor as a fraction of the cell radius (0 = none).
        rgb: haemoglobin colour.
        mimic: the normal type this one resembles (subtlety knob).
    """

    shape: str
    radius: Range
    aspect: Range = (1.0, 1.08)
    pallor: Range = (0.35, 0.45)
    rgb: RGB = (222.0, 140.0, 140.0)
    mimic: str | None = None


_NEUTRO_CYTO: RGB = (226.0, 205.0, 214.0)
_BLAST_CYTO: RGB = (150.0, 160.0, 210.0)

WHITE_CELLS: dict[str, WhiteCellSpec] = {
    # --- normal leukocytes ---
    "neutrophil": WhiteCellSpec(
        radius=(22, 26), nucleus_shape="multilobed", nc_ratio=(0.55, 0.65), chromatin_density=(0.85, 1.0),
        chromatin_coarseness=(0.6, 0.8), cytoplasm_rgb=_NEUTRO_CYTO, granule_rgb=(185.0, 140.0, 180.0),
        granule_density=(4.0, 7.0),
    ),
    "band": WhiteCellSpec(
        radius=(22, 26), nucleus_shape="band", nc_ratio=(0.55, 0.65), chromatin_density=(0.8, 0.95),
        chromatin_coarseness=(0.5, 0.7), cytoplasm_rgb=_NEUTRO_CYTO, granule_rgb=(185.0, 140.0, 180.0),
        granule_density=(4.0, 7.0),
    ),
    "eosinophil": WhiteCellSpec(
        radius=(24, 27), nucleus_shape="bilobed", nc_ratio=(0.5, 0.6), chromatin_density=(0.8, 0.95),
        cytoplasm_rgb=(228.0, 190.0, 170.0), granule_rgb=(222.0, 105.0, 60.0), granule_size=(2.0, 2.0),
        granule_density=(14.0, 20.0),
    ),
    "basophil": WhiteCellSpec(
        radius=(21, 24), nucleus_shape="bilobed", nc_ratio=(0.5, 0.6), chromatin_density=(0.7, 0.85),
        cytoplasm_rgb=(205.0, 190.0, 215.0), granule_rgb=(55.0, 20.0, 80.0), granule_size=(2.0, 3.0),
        granule_density=(6.0, 10.0), granules_over_nucleus=True,
    ),
    "lymphocyte": WhiteCellSpec(
        radius=(15, 19), nucleus_shape="round", nc_ratio=(0.78, 0.88), nucleus_offset=(0.1, 0.5),
        chromatin_density=(0.85, 1.0), chromatin_coarseness=(0.6, 0.9), cytoplasm_rgb=(155.0, 180.0, 225.0),
    ),
    "monocyte": WhiteCellSpec(
        radius=(27, 32), irregularity=(0.03, 0.08), elongation=(1.0, 1.2), nucleus_shape="indented",
        nc_ratio=(0.55, 0.65), chromatin_density=(0.55, 0.7), chromatin_coarseness=(0.2, 0.4),
        cytoplasm_rgb=(188.0, 182.0, 208.0), cytoplasm_texture=(0.04, 0.08), granule_rgb=(175.0, 130.0, 185.0),
        granule_density=(0.5, 1.5), vacuoles=(0.0, 3.0),
    ),
    "atypical_lymphocyte": WhiteCellSpec(
        radius=(24, 30), irregularity=(0.05, 0.1), elongation=(1.0, 1.25), nucleus_shape="round",
        nc_ratio=(0.5, 0.6), nucleus_offset=(0.2, 0.5), chromatin_density=(0.6, 0.8),
        chromatin_coarseness=(0.3, 0.5), cytoplasm_rgb=(120.0, 150.0, 215.0), cytoplasm_texture=(0.05, 0.1),
        nucleoli=(0.0, 1.0), mimic="lymphocyte",
    ),
    # --- abnormal (diagnostic) cells ---
    "myeloblast": WhiteCellSpec(
        radius=(24, 29), nucleus_shape="round", nc_ratio=(0.75, 0.85), chromatin_density=(0.45, 0.6),
        chromatin_coarseness=(0.0, 0.15), chromatin_rgb=(110.0, 60.0, 150.0), nucleoli=(2.0, 4.0),
        cytoplasm_rgb=_BLAST_CYTO, granule_rgb=(160.0, 60.0, 140.0), granule_density=(0.0, 0.8),
        mimic="lymphocyte",
    ),
    "myeloblast_auer": WhiteCellSpec(
        radius=(24, 29), nucleus_shape="round", nc_ratio=(0.7, 0.8), chromatin_density=(0.45, 0.6),
        chromatin_coarseness=(0.0, 0.15), chromatin_rgb=(110.0, 60.0, 150.0), nucleoli=(2.0, 4.0),
        cytoplasm_rgb=(165.0, 170.0, 212.0), granule_rgb=(160.0, 60.0, 140.0), granule_density=(0.3, 1.2),
        auer_rods=(1.0, 1.0), mimic="monocyte",
    ),
    "abnormal_promyelocyte": WhiteCellSpec(
        radius=(27, 32), irregularity=(0.02, 0.05), nucleus_shape="bilobed", nc_ratio=(0.5, 0.6),
        chromatin_density=(0.55, 0.7), chromatin_coarseness=(0.1, 0.3), chromatin_rgb=(105.0, 55.0, 140.0),
        nucleoli=(0.0, 2.0), cytoplasm_rgb=(200.0, 170.0, 200.0), granule_rgb=(120.0, 30.0, 110.0),
        granule_size=(1.0, 2.0), granule_density=(20.0, 32.0), auer_rods=(3.0, 7.0), auer_bundle=True,
        auer_probability=0.6, mimic="neutrophil",
    ),
    "abnormal_eosinophil": WhiteCellSpec(
        radius=(24, 28), nucleus_shape="indented", nc_ratio=(0.5, 0.6), chromatin_density=(0.7, 0.85),
        cytoplasm_rgb=(225.0, 190.0, 175.0), granule_rgb=(95.0, 35.0, 95.0), granule_size=(2.0, 3.0),
        granule_density=(10.0, 16.0), mimic="eosinophil",
    ),
    "monoblast": WhiteCellSpec(
        radius=(28, 34), irregularity=(0.02, 0.05), nucleus_shape="indented", nc_ratio=(0.68, 0.8),
        chromatin_density=(0.4, 0.55), chromatin_coarseness=(0.0, 0.15), chromatin_rgb=(115.0, 70.0, 155.0),
        nucleoli=(1.0, 3.0), cytoplasm_rgb=(165.0, 170.0, 205.0), cytoplasm_texture=(0.04, 0.08),
        vacuoles=(0.0, 4.0), mimic="monocyte",
    ),
    "lymphoblast": WhiteCellSpec(
        radius=(18, 23), nucleus_shape="round", nc_ratio=(0.85, 0.92), nucleus_offset=(0.0, 0.3),
        chromatin_density=(0.55, 0.7), chromatin_coarseness=(0.0, 0.2), chromatin_rgb=(100.0, 55.0, 140.0),
        nucleoli=(0.0, 2.0), cytoplasm_rgb=(130.0, 150.0, 215.0), mimic="lymphocyte",
    ),
}

#: A myeloblast with one Auer rod and nothing else changed (the ``auer`` task's diagnostic cell; with
#: ``subtlety`` the rod fades toward the plain myeloblast it mimics).
WHITE_CELLS["myeloblast_rod"] = replace(WHITE_CELLS["myeloblast"], auer_rods=(1.0, 1.0), mimic="myeloblast")

RED_CELLS: dict[str, RedCellSpec] = {
    "discocyte": RedCellSpec("disc", radius=(15, 17)),
    "spherocyte": RedCellSpec("disc", radius=(11.5, 13), pallor=(0.0, 0.0), rgb=(205.0, 105.0, 115.0),
                              mimic="discocyte"),
    "elliptocyte": RedCellSpec("ellipse", radius=(14, 16), aspect=(1.8, 2.4), pallor=(0.2, 0.3),
                               mimic="discocyte"),
    "sickle_cell": RedCellSpec("sickle", radius=(15, 18), aspect=(2.2, 2.8), pallor=(0.0, 0.0),
                               rgb=(212.0, 118.0, 125.0), mimic="discocyte"),
    "target_cell": RedCellSpec("target", radius=(15, 17), pallor=(0.55, 0.65), mimic="discocyte"),
    "microcytic_hypochromic": RedCellSpec("disc", radius=(11, 13), pallor=(0.6, 0.72),
                                          rgb=(232.0, 170.0, 168.0), mimic="discocyte"),
    "macro_ovalocyte": RedCellSpec("ellipse", radius=(18.5, 20.5), aspect=(1.25, 1.45), pallor=(0.1, 0.2),
                                   rgb=(215.0, 125.0, 130.0), mimic="discocyte"),
    "schistocyte": RedCellSpec("fragment", radius=(11, 15), pallor=(0.0, 0.1), mimic="discocyte"),
    "teardrop": RedCellSpec("teardrop", radius=(13, 15), pallor=(0.25, 0.35), mimic="discocyte"),
}


@dataclass(frozen=True)
class TaskSpec:
    """A diagnostic task: its classes and each class's mixture of diagnostic cells.

    Attributes:
        name: task name, also the label column of ``cohort.csv``.
        lineage: ``"wbc"`` (white-cell bags) or ``"rbc"`` (red-cell bags).
        control: the class without diagnostic cells.
        mixtures: class -> {cell type: weight} of its diagnostic cells.
        background: normal cell types of every patient with their mean fractions.
        confounders: look-alike cells any patient may carry at a low, patient-specific rate
            (not diagnostic), e.g. reactive lymphocytes.
        confounder_rate: upper bound of that per-patient rate.
    """

    name: str
    lineage: str
    control: str
    mixtures: dict[str, dict[str, float]]
    background: dict[str, float]
    confounders: dict[str, float] = field(default_factory=dict)
    confounder_rate: float = 0.0

    @property
    def classes(self) -> tuple[str, ...]:
        """Class names, control first."""
        return (self.control, *self.mixtures)


_WBC_BACKGROUND = {
    "neutrophil": 0.56, "band": 0.04, "lymphocyte": 0.29, "monocyte": 0.07, "eosinophil": 0.03, "basophil": 0.01,
}
_RBC_BACKGROUND = {"discocyte": 1.0}
_RBC_POIKILOCYTES = {name: 1.0 for name in RED_CELLS if name != "discocyte"}

TASKS: dict[str, TaskSpec] = {
    "aml": TaskSpec(
        name="aml",
        lineage="wbc",
        control="control",
        mixtures={
            "PML::RARA": {"abnormal_promyelocyte": 0.85, "myeloblast_auer": 0.15},
            "NPM1": {"myeloblast": 0.5, "monoblast": 0.5},
            "CBFB::MYH11": {"abnormal_eosinophil": 0.4, "monoblast": 0.3, "myeloblast": 0.3},
            "RUNX1::RUNX1T1": {"myeloblast_auer": 0.75, "myeloblast": 0.25},
        },
        background=_WBC_BACKGROUND,
        confounders={"atypical_lymphocyte": 1.0},
        confounder_rate=0.03,
    ),
    "all": TaskSpec(
        name="all",
        lineage="wbc",
        control="control",
        mixtures={"ALL": {"lymphoblast": 1.0}},
        background=_WBC_BACKGROUND,
        confounders={"atypical_lymphocyte": 1.0},
        confounder_rate=0.05,
    ),
    "anemia": TaskSpec(
        name="anemia",
        lineage="rbc",
        control="control",
        mixtures={
            "sickle_cell_disease": {"sickle_cell": 0.65, "target_cell": 0.35},
            "hereditary_spherocytosis": {"spherocyte": 1.0},
            "hereditary_elliptocytosis": {"elliptocyte": 1.0},
            "thalassemia": {"target_cell": 0.4, "microcytic_hypochromic": 0.4, "teardrop": 0.2},
            "iron_deficiency": {"microcytic_hypochromic": 0.7, "elliptocyte": 0.3},
        },
        background=_RBC_BACKGROUND,
        confounders=_RBC_POIKILOCYTES,
        confounder_rate=0.03,
    ),
    "auer": TaskSpec(
        name="auer",
        lineage="wbc",
        control="no_auer_rods",
        mixtures={"auer_rods": {"myeloblast_rod": 1.0}},
        background={**_WBC_BACKGROUND, "myeloblast": 0.08},
        confounders={"atypical_lymphocyte": 1.0},
        confounder_rate=0.03,
    ),
}

CELL_TYPES: tuple[str, ...] = (*WHITE_CELLS, *RED_CELLS)


def list_tasks() -> list[str]:
    """Names of the synthetic tasks."""
    return list(TASKS)


def list_cell_types(lineage: str | None = None) -> list[str]:
    """Names of the synthetic cell types, optionally only ``"wbc"`` or ``"rbc"``."""
    if lineage == "wbc":
        return list(WHITE_CELLS)
    if lineage == "rbc":
        return list(RED_CELLS)
    return list(CELL_TYPES)
