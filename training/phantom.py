"""Procedural synthetic chest phantom: anatomy, lesions and rendering (pure, numpy only).

A study is first *sampled* (:func:`sample_study`): every random choice (anatomy, lesion
placement, texture fields) is drawn once from a seeded generator into a frozen
:class:`PhantomStudy`. Rendering (:func:`render`) is then a deterministic function of that
study and an output size, so the same study renders consistently at the PNG size and at the
DICOM size, and every lesion box scales exactly between the two.

Geometry lives in normalised image coordinates ``(u, v)`` in ``[0, 1]`` (``u`` = column / width,
``v`` = row / height). The phantom is a PA view seen from the front: the patient's right lung
is on the image's left (``u < 0.5``). Intensities are drawn as a MONOCHROME2 image in
``[0, 1]`` (air dark, bone bright).

What is drawn: normal anatomy (body outline, lungs, trachea and main bronchi, mediastinum, heart,
aortic knob, spine, ribs, clavicles), the VinDr-CXR local classes of :data:`PHANTOM_CLASSES`
(each with a box: the bounding box of the pixels its drawing changes) and support devices
(:class:`Device`: an endotracheal tube and a right internal jugular central venous catheter).
Devices are a study attribute, not lesions: VinDr-CXR has no box class for them, so they change
pixels but never add a box. Together with the report templates of
:mod:`training.phantom_report`, the studies cover all 14 CheXpert observations.

Synthetic data, not for clinical use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from PIL import Image

from d2r_core.geometry import Box

FloatArray = npt.NDArray[np.float32]
Arr = npt.NDArray[Any]  # float32 or float64 working arrays

#: The VinDr-CXR classes the phantom draws (a subset of ``d2r_core.classes.VINDR_CLASSES``).
PHANTOM_CLASSES: tuple[str, ...] = (
    "Aortic enlargement",
    "Atelectasis",
    "Calcification",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Lung Opacity",
    "Lung cavity",
    "Nodule/Mass",
    "Pleural effusion",
    "Pleural thickening",
    "Pneumothorax",
    "Rib fracture",
)

#: Classes drawn in one hemithorax (laterality "R" or "L"); the others are midline ("U").
LATERALISED: frozenset[str] = frozenset(PHANTOM_CLASSES) - {"Aortic enlargement", "Cardiomegaly"}

#: Lateralised classes always drawn in both lungs: one lesion (and box) per side, "R" and "L";
#: the report states them without a side ("Mild pulmonary edema.").
BILATERAL: frozenset[str] = frozenset({"Edema"})

#: Relative frequency of each class among the 1-3 classes of an abnormal study. Consolidation is
#: drawn more often because a subset of it is reported as pneumonia (a CheXpert observation of
#: its own); the Lung Lesion classes (Nodule/Mass, Lung cavity) share one observation.
CLASS_WEIGHTS: dict[str, float] = {
    "Aortic enlargement": 1.0,
    "Atelectasis": 1.0,
    "Calcification": 0.7,
    "Cardiomegaly": 0.8,
    "Consolidation": 1.6,
    "Edema": 1.1,
    "Lung Opacity": 1.1,
    "Lung cavity": 0.7,
    "Nodule/Mass": 0.8,
    "Pleural effusion": 1.15,
    "Pleural thickening": 1.0,
    "Pneumothorax": 1.15,
    "Rib fracture": 1.1,
}

#: Support devices the phantom draws (no VinDr-CXR box class; a study attribute, no box).
DEVICE_KINDS: tuple[str, ...] = ("Endotracheal tube", "Central venous catheter")

#: default probability of support devices in a study (doubled with edema or consolidation)
DEVICE_FRACTION = 0.13

#: radius (image fractions) from which a consolidation is lobar: drawn larger and reported as
#: pneumonia; smaller ones are drawn smaller (a radius gap between the two) and never named
#: pneumonia outright
LOBAR_CONSOLIDATION = 0.075
_LOBAR_GAP = 0.0075  # each kind moves this far from the threshold

_CM = 1.0 / 43.0  # one centimetre in normalised units (43 cm field of view)

_TEXTURE = 48  # side of the low-resolution random fields upsampled into lung markings
_BOX_THRESHOLD = 0.04  # a lesion's support: pixels its drawing changes by more than this


@dataclass(frozen=True)
class Anatomy:
    """Normalised anatomical parameters of one phantom."""

    cx: float  # midline
    apex: float  # v of the lung apices
    dome: float  # v of the hemidiaphragm domes (patient right, left)
    dome_left: float
    costophrenic: float  # v of the costophrenic angles below the domes
    lung_half_width: float  # lateral extent of each lung from the midline (d_out at the base)
    mediastinum: float  # half width of the mediastinum
    heart_half_width: float
    heart_half_height: float
    heart_cv: float  # v of the heart's centre
    rib_spacing: float
    rib_tilt: float
    body_half_width: float
    soft_tissue: float
    lung_level: float
    noise_sigma: float

    @property
    def cardiothoracic_ratio(self) -> float:
        """Heart width over internal thoracic width (both lungs' outer borders)."""
        return self.heart_half_width / self.lung_half_width

    def heart_cu(self) -> float:
        """u of the heart's centre (two thirds of the heart lie left of the midline)."""
        return self.cx + 0.33 * self.heart_half_width

    @property
    def carina(self) -> float:
        """v of the tracheal carina (where the trachea divides into the main bronchi)."""
        return self.apex + 0.36 * (self.dome - self.apex)


class _Drawn:
    """Lookup of the drawing parameters and report attributes of a lesion or device."""

    params: tuple[tuple[str, float], ...]
    attributes: tuple[tuple[str, str], ...]

    def p(self, key: str) -> float:
        """Return drawing parameter ``key``."""
        return dict(self.params)[key]

    def attr(self, key: str, default: str = "") -> str:
        """Return descriptive attribute ``key`` (size word, zone, tip, ...) used by the report."""
        return dict(self.attributes).get(key, default)


@dataclass(frozen=True)
class Lesion(_Drawn):
    """One drawn lesion: class, laterality, and drawing parameters (normalised units)."""

    class_name: str
    laterality: str  # "R", "L" or "U" (patient's side)
    params: tuple[tuple[str, float], ...]
    attributes: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class Device(_Drawn):
    """One support device (a study attribute: drawn, reported, never boxed)."""

    kind: str  # one of DEVICE_KINDS
    params: tuple[tuple[str, float], ...]
    attributes: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class PhantomStudy:
    """Everything random about one study, drawn once; rendering is deterministic from it."""

    index: int
    seed: int
    anatomy: Anatomy
    lesions: tuple[Lesion, ...]
    texture: FloatArray = field(repr=False, compare=False)  # (2, T, T) marking fields
    noise_seed: int = 0
    devices: tuple[Device, ...] = ()


@dataclass(frozen=True)
class Rendered:
    """A rendered image and the lesion boxes in normalised coordinates (same order as lesions)."""

    image: FloatArray  # (size, size) in [0, 1], MONOCHROME2
    boxes: tuple[Box, ...]


# --------------------------------------------------------------------------- sampling


def _side_sign(laterality: str) -> float:
    # patient's right is the image's left (u < cx)
    return -1.0 if laterality == "R" else 1.0


def sample_anatomy(rng: np.random.Generator, *, cardiomegaly: bool) -> Anatomy:
    """Draw normal anatomical variation (and an enlarged heart if ``cardiomegaly``)."""
    lung_w = float(rng.uniform(0.32, 0.36))
    ctr = float(rng.uniform(0.58, 0.66) if cardiomegaly else rng.uniform(0.38, 0.45))
    dome = float(rng.uniform(0.66, 0.71))
    return Anatomy(
        cx=float(rng.uniform(0.49, 0.51)),
        apex=float(rng.uniform(0.12, 0.15)),
        dome=dome,
        dome_left=dome + float(rng.uniform(0.01, 0.03)),
        costophrenic=dome + float(rng.uniform(0.07, 0.09)),
        lung_half_width=lung_w,
        mediastinum=float(rng.uniform(0.05, 0.06)),
        heart_half_width=ctr * lung_w,
        heart_half_height=float(rng.uniform(0.10, 0.12)) * (1.15 if cardiomegaly else 1.0),
        heart_cv=dome - float(rng.uniform(0.06, 0.08)),
        rib_spacing=float(rng.uniform(0.056, 0.064)),
        rib_tilt=float(rng.uniform(0.55, 0.8)),
        body_half_width=float(rng.uniform(0.43, 0.47)),
        soft_tissue=float(rng.uniform(0.46, 0.54)),
        lung_level=float(rng.uniform(0.12, 0.18)),
        noise_sigma=float(rng.uniform(0.012, 0.02)),
    )


def _d_out(a: Anatomy, v: Arr | float) -> Arr:
    """Outer (lateral) lung border distance from the midline at height ``v``."""
    t = np.clip((np.asarray(v) - a.apex) / (a.costophrenic - a.apex), 0.0, 1.0)
    return 0.10 + (a.lung_half_width - 0.10) * np.sqrt(t) ** 0.8


def _diaphragm(a: Anatomy, d: Arr, sign: float) -> Arr:
    """v of the hemidiaphragm at lateral distance ``d`` on side ``sign``."""
    dome = a.dome if sign < 0 else a.dome_left
    mid = 0.45 * a.lung_half_width
    k = (a.costophrenic - dome) / (a.lung_half_width - mid) ** 2
    return dome + k * (d - mid) ** 2


def _rib_v(a: Anatomy, k: int, d: Arr | float) -> Arr:
    """Centre line of posterior rib ``k`` (0 = first) at lateral distance ``d``."""
    d = np.asarray(d)
    return a.apex - 0.01 + k * a.rib_spacing + a.rib_tilt * (d - 0.04) ** 2 + 0.12 * (d - 0.04)


def _lung_zone(a: Anatomy, v: float) -> str:
    t = (v - a.apex) / (a.dome - a.apex)
    return "upper" if t < 0.36 else ("mid" if t < 0.68 else "lower")


def _point_in_lung(
    rng: np.random.Generator, a: Anatomy, sign: float, margin: float
) -> tuple[float, float]:
    """A point well inside the lung on side ``sign``, at least ``margin`` from its borders."""
    for _ in range(200):
        v = float(rng.uniform(a.apex + 0.06 + margin, a.dome - 0.02 - margin))
        d_in = a.mediastinum + 0.03
        if abs(v - a.heart_cv) < a.heart_half_height + margin:
            heart_cu = a.heart_cu() - a.cx
            reach = heart_cu + a.heart_half_width if sign > 0 else a.heart_half_width - heart_cu
            d_in = max(d_in, reach)
        d_out = float(_d_out(a, v)) - margin - 0.01
        if d_out - (d_in + margin) > 0.02:
            d = float(rng.uniform(d_in + margin, d_out))
            if v + margin < float(_diaphragm(a, np.asarray(d), sign)) - 0.01:
                return a.cx + sign * d, v
    return a.cx + sign * 0.2, a.apex + 0.25


def _approx_box(lesion: Lesion, a: Anatomy) -> Box:
    """Cheap normalised box used only to keep sampled lesions apart."""
    name = lesion.class_name
    if name == "Cardiomegaly":
        hu = a.heart_cu()
        return (
            hu - a.heart_half_width,
            a.heart_cv - a.heart_half_height,
            hu + a.heart_half_width,
            a.heart_cv + a.heart_half_height,
        )
    if name == "Pleural effusion":
        s = _side_sign(lesion.laterality)
        lo, hi = sorted((a.cx + s * 0.05, a.cx + s * a.lung_half_width))
        return lo, lesion.p("level") - 0.07, hi, a.costophrenic + 0.01
    if name == "Pneumothorax":
        s = _side_sign(lesion.laterality)
        lo, hi = sorted((a.cx + s * 0.06, a.cx + s * (a.lung_half_width + 0.01)))
        return lo, a.apex - 0.01, hi, lesion.p("stop")
    if name == "Edema":  # most of one lung; other lesions may overlap it
        s = _side_sign(lesion.laterality)
        lo, hi = sorted((a.cx + s * a.mediastinum, a.cx + s * a.lung_half_width))
        return lo, a.apex + 0.1, hi, a.costophrenic
    u, v, r = lesion.p("u"), lesion.p("v"), lesion.p("r")
    return u - r, v - r, u + r, v + r


def _overlaps(b: Box, others: list[Box]) -> bool:
    return any(b[0] < o[2] and o[0] < b[2] and b[1] < o[3] and o[1] < b[3] for o in others)


def _sample_lesion(name: str, rng: np.random.Generator, a: Anatomy, laterality: str) -> Lesion:
    s = _side_sign(laterality)
    if name == "Cardiomegaly":
        return Lesion(name, "U", (("ctr", a.cardiothoracic_ratio),))
    if name == "Aortic enlargement":
        r = float(rng.uniform(0.05, 0.065))
        return Lesion(name, "U", (("u", a.cx + a.mediastinum + r * 0.45), ("v", 0.27), ("r", r)))
    if name == "Pleural effusion":
        h = float(rng.uniform(0.08, 0.2))
        size = "small" if h < 0.12 else ("moderate" if h < 0.16 else "large")
        return Lesion(name, laterality, (("level", a.costophrenic - h),), (("size", size),))
    if name == "Pneumothorax":
        gap = float(rng.uniform(0.045, 0.075))
        stop = a.apex + float(rng.uniform(0.3, 0.42))
        size = "small" if gap < 0.055 else "moderate"
        return Lesion(name, laterality, (("gap", gap), ("stop", stop)), (("size", size),))
    if name == "Pleural thickening":
        v0 = float(rng.uniform(a.apex + 0.12, a.dome - 0.2))
        d = float(_d_out(a, v0 + 0.07))
        return Lesion(
            name,
            laterality,
            (
                ("u", a.cx + s * d),
                ("v", v0 + 0.07),
                ("r", 0.08),
                ("thick", float(rng.uniform(0.018, 0.026))),
            ),
        )
    if name == "Rib fracture":
        k = int(rng.integers(4, 8))
        d = float(rng.uniform(0.2, 0.27))
        u, v = a.cx + s * d, float(_rib_v(a, k, d))
        ordinal = {4: "5th", 5: "6th", 6: "7th", 7: "8th"}[k]
        return Lesion(
            name,
            laterality,
            (("u", u), ("v", v), ("r", 0.03), ("rib", float(k)), ("d", d)),
            (("rib", ordinal),),
        )
    sizes = {
        "Nodule/Mass": (0.022, 0.05),
        "Consolidation": (0.06, 0.09),
        "Lung Opacity": (0.055, 0.08),
        "Lung cavity": (0.04, 0.055),
        "Calcification": (0.022, 0.03),
        "Atelectasis": (0.07, 0.09),
    }
    r = float(rng.uniform(*sizes[name]))
    lobar = name == "Consolidation" and r >= LOBAR_CONSOLIDATION
    if name == "Consolidation":
        r += _LOBAR_GAP if lobar else -_LOBAR_GAP
    u, v = _point_in_lung(rng, a, s, r)
    attrs: list[tuple[str, str]] = [("zone", _lung_zone(a, v))]
    params: list[tuple[str, float]] = [("u", u), ("v", v), ("r", r)]
    if name == "Nodule/Mass":
        attrs.append(("kind", "mass" if r > 0.038 else "nodule"))
        attrs.append(("cm", f"{r * 2 * 43:.1f}"))  # 43 cm field of view
    if name == "Atelectasis":
        params.append(("angle", float(rng.uniform(-0.25, 0.25))))
    if name == "Consolidation":
        # the report follows what the image shows: a lobar-size consolidation is reported as
        # pneumonia ("positive"); a smaller, patchy one as consolidation, at most "concerning
        # for"/"compatible with" pneumonia (uncertain) or without a word of it
        offsets = rng.uniform(-0.55, 0.55, size=(6, 2)) * r
        for i, (du, dv) in enumerate(offsets):
            params += [(f"bu{i}", float(du)), (f"bv{i}", float(dv))]
        kinds = ["concerning", "compatible", ""]
        said = str(rng.choice(kinds, p=[0.4, 0.25, 0.35]))
        attrs.append(("pneumonia", "positive" if lobar else said))
    if name == "Lung Opacity":
        offsets = rng.uniform(-0.5, 0.5, size=(4, 2)) * r
        for i, (du, dv) in enumerate(offsets):
            params += [(f"bu{i}", float(du)), (f"bv{i}", float(dv))]
        params.append(("density", float(rng.uniform(0.15, 0.19))))
    if name == "Calcification":
        dots = rng.uniform(-0.6, 0.6, size=(int(rng.integers(3, 6)), 2)) * r
        for i, (du, dv) in enumerate(dots):
            params += [(f"cu{i}", float(du)), (f"cv{i}", float(dv))]
    if name == "Lung cavity":
        params.append(("fluid", float(rng.uniform(0.0, 1.0))))
    return Lesion(name, laterality, tuple(params), tuple(attrs))


def _sample_edema(rng: np.random.Generator) -> tuple[Lesion, Lesion]:
    """Bilateral edema: one lesion per lung sharing severity and Kerley-line phase."""
    severity = float(rng.uniform(0.85, 1.3))
    params = (
        ("severity", severity),
        ("phase", float(rng.uniform(0.0, 1.0))),
        ("hilum_spread", float(rng.uniform(0.11, 0.14))),
    )
    attrs = (("grade", "mild" if severity < 1.05 else "moderate"),)
    return Lesion("Edema", "R", params, attrs), Lesion("Edema", "L", params, attrs)


def _sample_devices(rng: np.random.Generator, a: Anatomy) -> tuple[Device, ...]:
    """An endotracheal tube, a right internal jugular central venous catheter, or both."""
    pick = float(rng.random())
    devices: list[Device] = []
    if pick < 0.65:
        cm = int(rng.integers(3, 7))  # tip 3-6 cm above the carina
        devices.append(
            Device(
                "Endotracheal tube",
                (
                    ("u", a.cx + float(rng.uniform(-0.005, 0.005))),
                    ("tip", a.carina - cm * _CM),
                    ("stripe", float(rng.choice([-1.0, 1.0]))),
                ),
                (("cm", str(cm)),),
            )
        )
    if pick >= 0.4:
        devices.append(
            Device(
                "Central venous catheter",
                (
                    ("u_top", a.cx - float(rng.uniform(0.075, 0.095))),
                    ("v_top", float(rng.uniform(0.0, 0.03))),
                    ("u_tip", a.cx - a.mediastinum + float(rng.uniform(0.012, 0.02))),
                    ("tip", a.carina + float(rng.uniform(0.005, 0.045))),
                    ("bend", float(rng.uniform(1.4, 2.2))),
                ),
                (("side", "right"), ("tip", "SVC")),
            )
        )
    return tuple(devices)


def sample_study(
    seed: int,
    index: int,
    *,
    normal_fraction: float = 0.3,
    device_fraction: float = DEVICE_FRACTION,
) -> PhantomStudy:
    """Draw study ``index`` of the phantom set with base ``seed``.

    Parameters
    ----------
    seed, index : int
        The study's random stream is ``numpy.random.default_rng([seed, index])``.
    normal_fraction : float
        Probability that the study has no lesion.
    device_fraction : float
        Probability that the study has support devices (doubled, up to 1, when it has
        edema or consolidation); independent of ``normal_fraction``.
    """
    rng = np.random.default_rng([seed, index])
    normal = bool(rng.random() < normal_fraction)
    names: list[str] = []
    if not normal:
        count = int(rng.choice([1, 2, 3], p=[0.45, 0.35, 0.2]))
        w = np.array([CLASS_WEIGHTS[c] for c in PHANTOM_CLASSES])
        chosen = rng.choice(PHANTOM_CLASSES, size=count, replace=False, p=w / w.sum())
        names = [str(n) for n in chosen]
        # edema often comes with an enlarged heart (still at most 3 classes)
        if "Edema" in names and "Cardiomegaly" not in names and rng.random() < 0.5:
            if len(names) == 3:
                names.remove(next(n for n in names if n != "Edema"))
            names.append("Cardiomegaly")
    a = sample_anatomy(rng, cardiomegaly="Cardiomegaly" in names)
    lesions: list[Lesion] = []
    boxes: list[Box] = []
    pleural_sides: dict[str, str] = {}
    for name in sorted(names, key=PHANTOM_CLASSES.index):
        if name == "Edema":  # both lungs; diffuse, so other lesions may overlap it
            lesions.extend(_sample_edema(rng))
            continue
        for _ in range(30):
            lat = str(rng.choice(["R", "L"])) if name in LATERALISED else "U"
            # an effusion and a pneumothorax on one side would be a hydropneumothorax
            if name in ("Pleural effusion", "Pneumothorax") and lat in pleural_sides.values():
                lat = "L" if lat == "R" else "R"
            lesion = _sample_lesion(name, rng, a, lat)
            box = _approx_box(lesion, a)
            if name == "Cardiomegaly" or not _overlaps(box, boxes):
                break
        if name == "Cardiomegaly" or not _overlaps(box, boxes):
            lesions.append(lesion)
            boxes.append(box)
            if name in ("Pleural effusion", "Pneumothorax"):
                pleural_sides[name] = lat
    texture = rng.standard_normal((2, _TEXTURE, _TEXTURE)).astype(np.float32)
    noise_seed = int(rng.integers(0, 2**31 - 1))
    p_devices = device_fraction * (2.0 if {"Edema", "Consolidation"} & set(names) else 1.0)
    devices = _sample_devices(rng, a) if rng.random() < p_devices else ()
    return PhantomStudy(
        index=index,
        seed=seed,
        anatomy=a,
        lesions=tuple(lesions),
        texture=texture,
        noise_seed=noise_seed,
        devices=devices,
    )


# --------------------------------------------------------------------------- rendering


def _upsample(field_: FloatArray, size: int) -> FloatArray:
    img = Image.fromarray(np.ascontiguousarray(field_, dtype=np.float32))
    return np.asarray(img.resize((size, size), Image.Resampling.BICUBIC), dtype=np.float32)


def _smooth_step(x: Arr, width: float) -> Arr:
    """0 below ``-width``, 1 above ``width``, smooth in between (soft edges)."""
    return np.minimum(np.maximum(x * (0.5 / width) + 0.5, 0.0), 1.0)


def _disc(
    uu: Arr,
    vv: Arr,
    u: float,
    v: float,
    r: float,
    edge: float,
) -> Arr:
    rho = np.hypot(uu - u, vv - v)
    return _smooth_step(r - rho, edge)


class _Canvas:
    """Grids and anatomical masks of one study at one size."""

    def __init__(self, a: Anatomy, size: int) -> None:
        c = ((np.arange(size) + 0.5) / size).astype(np.float32)
        self.uu, self.vv = np.meshgrid(c, c)
        self.size = size
        self.px = 1.0 / size
        self.a = a
        self.sign = np.where(self.uu < a.cx, -1.0, 1.0)
        self.d = np.abs(self.uu - a.cx)
        edge = max(1.5 * self.px, 0.003)
        self.edge = edge
        d_out = _d_out(a, self.vv)
        top = a.apex + 2.5 * (self.d - 0.17) ** 2
        dia = _diaphragm(a, self.d, 1.0)
        dia = np.where(self.sign < 0, _diaphragm(a, self.d, -1.0), dia)
        self.dia = dia
        hemi = (
            _smooth_step(d_out - self.d, edge)
            * _smooth_step(self.vv - top, edge)
            * _smooth_step(dia - self.vv, edge)
        )
        self.hemithorax = hemi * _smooth_step(self.d - a.mediastinum, edge)
        hu = a.heart_cu()
        heart = ((self.uu - hu) / a.heart_half_width) ** 2 + (
            (self.vv - a.heart_cv) / a.heart_half_height
        ) ** 2
        self.heart = _smooth_step(1.0 - heart, 0.03) * (self.vv < dia + 0.02)
        self.lung = self.hemithorax * (1.0 - self.heart)


def _draw_ribs(cv: _Canvas, fracture: Lesion | None) -> Arr:
    a = cv.a
    out = np.zeros_like(cv.uu)
    thick = 0.5 * a.rib_spacing * 0.42
    reach = a.lung_half_width + 0.06
    for k in range(10):
        # only the rows this rib can touch (ribs slope down laterally)
        lo = float(_rib_v(a, k, 0.0)) - thick - 0.02
        hi = float(_rib_v(a, k, reach)) + thick + 0.02
        rows = slice(max(0, int(lo * cv.size)), min(cv.size, int(np.ceil(hi * cv.size))))
        d, sign, vv = cv.d[rows], cv.sign[rows], cv.vv[rows]
        if fracture is not None and int(fracture.p("rib")) == k:
            fs = _side_sign(fracture.laterality)
            shifted = (sign == fs) & (d > fracture.p("d"))
            vv = np.where(shifted, vv - 0.012, vv)  # displaced lateral fragment
        dist = np.abs(vv - _rib_v(a, k, d))
        band = _smooth_step(thick - dist, cv.edge)
        cortex = _smooth_step(dist - thick * 0.55, cv.edge) * band
        rib = (0.07 * band + 0.05 * cortex) * _smooth_step(reach - 0.01 - d, 0.01)
        rib *= _smooth_step(d - 0.03, 0.01)
        if fracture is not None and int(fracture.p("rib")) == k:
            gap = (sign == fs) & (np.abs(d - fracture.p("d")) < 0.007)
            rib = np.where(gap, -0.04 * band, rib)
        out[rows] += rib
    return out


def _lesion_delta(lesion: Lesion, cv: _Canvas, img: Arr, markings: Arr) -> Any:
    """Return the change the lesion makes to ``img`` (the box is this change's support)."""
    a, uu, vv, e = cv.a, cv.uu, cv.vv, cv.edge
    name = lesion.class_name
    side = cv.sign == _side_sign(lesion.laterality)
    if name == "Cardiomegaly":
        return np.zeros_like(img)  # drawn through the anatomy; box from the heart mask
    if name == "Aortic enlargement":
        knob = _disc(uu, vv, lesion.p("u"), lesion.p("v"), lesion.p("r"), e)
        return np.maximum(0.0, 0.72 - img) * knob
    if name == "Pleural effusion":
        span = a.lung_half_width - a.mediastinum
        surface = lesion.p("level") - 0.07 * np.clip((cv.d - a.mediastinum) / span, 0, 1) ** 2
        fluid = cv.hemithorax * side * _smooth_step(vv - surface, 0.012)
        return (0.62 - img) * fluid * 0.95
    if name == "Pneumothorax":
        gap, stop = lesion.p("gap"), lesion.p("stop")
        taper = np.clip((stop - vv) / (stop - a.apex), 0.0, 1.0) ** 0.6 * gap
        inner = _d_out(a, vv) - taper
        top = a.apex + 2.5 * (cv.d - 0.17) ** 2 + taper
        collapsed = _smooth_step(inner - cv.d, e) * _smooth_step(vv - top, e)
        region = cv.lung * side * (1.0 - collapsed) * (vv < stop)
        pleura = np.exp(-(((cv.d - inner) / (1.2 * cv.px + 0.0015)) ** 2)) * side
        pleura *= (vv < stop - 0.01) * (vv > a.apex) * (cv.d < _d_out(a, vv))
        return (0.03 - img) * region + (markings * 0.0) + 0.22 * pleura * (1 - region)
    if name == "Pleural thickening":
        band_d = _d_out(a, vv)
        t = lesion.p("thick")
        along = _smooth_step(lesion.p("r") - np.abs(vv - lesion.p("v")), 0.01)
        plate = _smooth_step(cv.d - (band_d - t), e) * _smooth_step(band_d + 0.004 - cv.d, e)
        return 0.32 * plate * along * side
    if name == "Rib fracture":
        callus = _disc(uu, vv, lesion.p("u"), lesion.p("v"), 0.017, 0.006)
        return 0.25 * callus
    lung = np.maximum(cv.lung, 0.0)
    if name == "Edema":
        return _edema_delta(lesion, cv) * lung * side
    u, v, r = lesion.p("u"), lesion.p("v"), lesion.p("r")
    if name == "Lung Opacity":
        # ground glass: faint, soft-edged, no air bronchograms; the markings stay visible
        blob = np.zeros_like(img)
        for i in range(4):
            blob = np.maximum(
                blob, _disc(uu, vv, u + lesion.p(f"bu{i}"), v + lesion.p(f"bv{i}"), 0.6 * r, 0.035)
            )
        return lesion.p("density") * blob * blob * (3.0 - 2.0 * blob) * lung
    if name == "Nodule/Mass":
        rho = np.hypot(uu - u, vv - v) / r
        dome = np.sqrt(np.clip(1 - rho**2, 0, 1))
        return 0.38 * np.clip(dome * 1.6, 0, 1) * _smooth_step(1 - rho, e / r)
    if name == "Consolidation":
        blob = np.zeros_like(img)
        for i in range(6):
            blob = np.maximum(
                blob, _disc(uu, vv, u + lesion.p(f"bu{i}"), v + lesion.p(f"bv{i}"), 0.55 * r, 0.02)
            )
        bronchogram = np.abs(np.sin((uu - u) * 95 + (vv - v) * 40)) > 0.93
        return (0.33 - 0.12 * bronchogram) * blob * lung
    if name == "Atelectasis":
        ang = lesion.p("angle")
        along = (uu - u) * np.cos(ang) + (vv - v) * np.sin(ang)
        across = -(uu - u) * np.sin(ang) + (vv - v) * np.cos(ang)
        band = _smooth_step(r - np.abs(along), 0.01) * _smooth_step(0.016 - np.abs(across), e)
        return 0.36 * band * lung
    if name == "Calcification":
        dots = np.zeros_like(img)
        i = 0
        while f"cu{i}" in dict(lesion.params):
            dots = np.maximum(
                dots, _disc(uu, vv, u + lesion.p(f"cu{i}"), v + lesion.p(f"cv{i}"), 0.0075, e)
            )
            i += 1
        return 0.55 * dots
    if name == "Lung cavity":
        rho = np.hypot(uu - u, vv - v)
        wall = _smooth_step(r - rho, e) * _smooth_step(rho - (r - 0.014), e)
        lumen = _smooth_step(r - 0.014 - rho, e)
        level = v + (0.5 - lesion.p("fluid")) * 0.4 * r
        fluid = lumen * _smooth_step(vv - level, e)
        return 0.38 * wall + (0.04 - img) * lumen * (1 - fluid) + 0.25 * fluid
    raise ValueError(f"class_name: the phantom cannot draw {name!r}")


def _edema_delta(lesion: Lesion, cv: _Canvas) -> Arr:
    """Perihilar and basal interstitial haze plus Kerley B lines (both sides; caller masks)."""
    a, vv, d = cv.a, cv.vv, cv.d
    sev, spread = lesion.p("severity"), lesion.p("hilum_spread")
    perihilar = np.exp(-(((d - 0.07) / spread) ** 2) - ((vv - 0.43) / 0.15) ** 2)
    basal = np.clip((vv - (a.dome - 0.26)) / 0.2, 0.0, 1.0)
    haze = 0.12 * sev * np.maximum(perihilar, 0.55 * basal)
    # Kerley B: short horizontal lines running in from the lateral pleura at the bases
    spacing = 0.016
    phase = vv / spacing + lesion.p("phase")
    k = np.floor(phase)
    dist = np.abs(phase - k - 0.5) * spacing
    line = _smooth_step(max(0.0022, 0.5 * cv.px) - dist, max(0.0012, 0.5 * cv.px))
    length = 0.022 + 0.014 * (0.5 + 0.5 * np.sin(k * 2.39 + 7.0 * lesion.p("phase")))
    lateral = _smooth_step(d - (_d_out(a, vv) - length), cv.edge)
    lower = _smooth_step(vv - (a.dome - 0.15), 0.01)
    out: Arr = haze + 0.13 * sev * line * lateral * lower
    return out


def _line_edge(cv: _Canvas) -> float:
    return max(0.6 * cv.px, 0.001)


def _device_delta(device: Device, cv: _Canvas) -> Arr:
    """The (bright, radio-opaque) change a support device makes; it has no box."""
    out = np.zeros_like(cv.uu)
    # both devices run down from the top of the image to a tip above the heart
    rows = slice(0, min(cv.size, int(np.ceil((device.p("tip") + 0.01) * cv.size))))
    uu, vv = cv.uu[rows], cv.vv[rows]
    le = _line_edge(cv)
    if device.kind == "Endotracheal tube":
        x = uu - device.p("u")
        half = 0.011  # about 1 cm outer diameter
        along = _smooth_step(device.p("tip") - vv, le)
        lumen = _smooth_step(half - np.abs(x), le)
        walls = _smooth_step(max(0.0015, 0.5 * cv.px) - np.abs(np.abs(x) - half), le)
        off = device.p("stripe") * (half - 0.003)
        stripe = _smooth_step(max(0.002, 0.6 * cv.px) - np.abs(x - off), le)
        out[rows] = (0.05 * lumen + 0.1 * walls + 0.24 * stripe) * along
        return out
    if device.kind == "Central venous catheter":
        top_u, top_v = device.p("u_top"), device.p("v_top")
        tip_u, tip_v, bend = device.p("u_tip"), device.p("tip"), device.p("bend")
        span = tip_v - top_v
        t = np.clip((tip_v - vv) / span, 0.0, 1.0)  # 0 at the tip, 1 at the neck
        centre = tip_u + (top_u - tip_u) * t**bend
        slope = (top_u - tip_u) * bend * t ** (bend - 1.0) / span
        dist = np.abs(uu - centre) / np.sqrt(1.0 + slope**2)
        line = _smooth_step(max(0.0025, 0.6 * cv.px) - dist, le)
        line *= _smooth_step(tip_v - vv, le) * _smooth_step(vv - top_v, le)
        out[rows] = 0.3 * line
        return out
    raise ValueError(f"kind: the phantom cannot draw device {device.kind!r}")


def render(study: PhantomStudy, size: int, *, noise: bool = True) -> Rendered:
    """Render ``study`` as a ``size`` x ``size`` image in ``[0, 1]`` with normalised lesion boxes.

    Parameters
    ----------
    study : PhantomStudy
        The sampled study.
    size : int
        Output side in pixels (at least 64).
    noise : bool
        Add quantum-like pixel noise (drawn from the study's own noise seed and ``size``).
    """
    if size < 64:
        raise ValueError(f"size: must be at least 64 pixels, got {size}")
    a = study.anatomy
    cv = _Canvas(a, size)
    uu, vv = cv.uu, cv.vv
    # body outline with neck and shoulders, abdomen below the diaphragm
    shoulder = a.body_half_width * np.clip(0.35 + 0.65 * (vv - 0.02) / 0.12, 0.35, 1.0)
    body = _smooth_step(shoulder - cv.d, 0.01)
    tissue = a.soft_tissue * (0.85 + 0.3 * vv) * (1.0 - 0.35 * (cv.d / a.body_half_width) ** 4)
    img = 0.03 + (tissue - 0.03) * body
    img = img + 0.1 * _smooth_step(vv - cv.dia, 0.01) * body  # abdomen
    # lungs with vascular markings strongest near the hila
    t0, t1 = (_upsample(study.texture[i], size) for i in range(2))
    vessels = np.maximum(np.abs(t0) - 0.6, 0) * 0.5 + 0.02 * t1
    hilum = np.exp(-(((cv.d - 0.09) / 0.06) ** 2 + ((vv - 0.42) / 0.1) ** 2))
    markings = vessels * (1.2 - cv.d / a.lung_half_width) * 0.08 + 0.12 * hilum
    lung = np.minimum(np.maximum(cv.lung, 0.0), 1.0)
    img = img * (1.0 - lung) + (a.lung_level + 0.05 * vv) * lung
    # mediastinum, heart, aortic knob, spine
    med_top = np.clip((vv - 0.04) / 0.05, 0, 1)
    med = _smooth_step(a.mediastinum - cv.d, 0.006) * med_top * (vv < cv.dia + 0.01)
    img = np.maximum(img, 0.66 * med)
    img = np.maximum(img, 0.64 * cv.heart)
    img = np.maximum(img, 0.66 * _disc(uu, vv, a.cx + a.mediastinum + 0.012, 0.27, 0.03, 0.006))
    spine = _smooth_step(0.032 - cv.d, 0.004) * (vv > 0.02)
    discs = (np.abs(((vv - a.apex) / 0.045) % 1.0 - 0.5) > 0.42) * spine
    img = img + 0.14 * spine - 0.06 * discs
    # trachea and main bronchi: lucent air columns over the mediastinum (rows above the hila)
    rows = slice(0, min(size, int(np.ceil((a.carina + 0.1) * size))))
    d, vr = cv.d[rows], vv[rows]
    airway = _smooth_step(0.02 - d, 0.004) * _smooth_step(vr - 0.035, 0.01)
    airway = airway * _smooth_step(a.carina - vr, 0.004)
    below = vr - a.carina
    for s, slope, length in ((-1.0, 0.65, 0.07), (1.0, 1.25, 0.08)):
        dist = np.abs(d - slope * below) / np.hypot(1.0, slope)
        bronchus = _smooth_step(0.013 - dist, 0.004) * (cv.sign[rows] == s)
        bronchus *= _smooth_step(below, 0.004) * _smooth_step(length - below, 0.01)
        airway = np.maximum(airway, bronchus)
    img[rows] -= 0.13 * airway * (1.0 - lung[rows])
    fracture = next((le for le in study.lesions if le.class_name == "Rib fracture"), None)
    img = img + _draw_ribs(cv, fracture) * body
    # clavicles
    for s in (-1.0, 1.0):
        along = np.clip((cv.d - 0.04) / 0.26, 0, 1)
        centre = 0.135 - 0.045 * along + 0.02 * np.sin(along * np.pi)
        clav = _smooth_step(0.011 - np.abs(vv - centre), cv.edge) * (cv.sign == s)
        clav *= (cv.d > 0.03) & (cv.d < 0.31)
        img = img + 0.16 * clav
    base = img + markings * lung
    # lesions
    deltas = [_lesion_delta(le, cv, base, markings * lung) for le in study.lesions]
    img = base + sum(deltas, np.zeros_like(base))
    boxes = []
    for le, delta in zip(study.lesions, deltas, strict=True):
        mask = cv.heart > 0.5 if le.class_name == "Cardiomegaly" else np.abs(delta) > _BOX_THRESHOLD
        boxes.append(_mask_box(mask, size))
    # support devices lie over everything and get no box
    for device in study.devices:
        img = img + _device_delta(device, cv)
    if noise:
        rng = np.random.default_rng([study.noise_seed, size])
        grain = rng.standard_normal((size, size), dtype=np.float32)
        img = img + a.noise_sigma * grain * (0.6 + 0.6 * img)
    return Rendered(image=np.clip(img, 0.0, 1.0).astype(np.float32), boxes=tuple(boxes))


def _mask_box(mask: npt.NDArray[np.bool_], size: int) -> Box:
    """Normalised ``[x_min, y_min, x_max, y_max]`` of a mask's pixels (pixel edges)."""
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    if rows.size == 0:
        return (0.0, 0.0, 0.0, 0.0)
    return (cols[0] / size, rows[0] / size, (cols[-1] + 1) / size, (rows[-1] + 1) / size)


__all__ = [
    "BILATERAL",
    "CLASS_WEIGHTS",
    "DEVICE_KINDS",
    "LATERALISED",
    "PHANTOM_CLASSES",
    "Anatomy",
    "Device",
    "Lesion",
    "PhantomStudy",
    "Rendered",
    "render",
    "sample_anatomy",
    "sample_study",
]
