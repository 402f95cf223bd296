"""Anatomy tables of the thigh/hip phantom (data only; used by modelkit.phantom).

Coordinates of a *reference subject* (woman, 1.65 m, girth scale 1.0), in mm, for
the patient's LEFT side; the right side is the mirror image:

* ``z``: superior positive, 0 at the iliac crest, the knee joint at about -520 mm
  (scaled by height / 1.65 m).
* ``u``: distance lateral of the midline (positive = away from the midline).
* ``y``: posterior positive (LPS), 0 at the centre of the femoral head.

A muscle is a list of keyframes ``(z, u, y, a, b, rot_deg, anchor)``: at height ``z``
its axial cross-section is an ellipse centred at ``(u, y)`` with semi-axes ``a`` (along
the rotated u axis) and ``b`` (along the rotated y axis), rotated by ``rot_deg``
(counter-clockwise from +u toward +y). ``anchor`` is ``"abs"`` (the coordinates are
absolute) or ``"femur"`` (``u``/``y`` are offsets from the femoral shaft axis at that
height, ``u`` positive lateral). Between keyframes the generator interpolates with a
monotone cubic (PCHIP); outside the first/last keyframe the muscle is absent.
"""

from __future__ import annotations

from dataclasses import dataclass

REFERENCE_HEIGHT_M = 1.65
KNEE_Z_MM = -520.0
TOP_Z_MM = 12.0
CROTCH_Z_MM = -185.0

# Femur (left side, reference subject).
FEMORAL_HEAD_CENTER_MM = (85.0, 0.0, -100.0)  # (u, y, z)
FEMORAL_HEAD_RADIUS_MM = 23.0
NECK_BASE_MM = (112.0, 4.0, -120.0)
NECK_RADIUS_MM = 14.5
GREATER_TROCHANTER_MM = (124.0, 10.0, -114.0)
GREATER_TROCHANTER_SEMI_MM = (15.0, 20.0, 24.0)
LESSER_TROCHANTER_MM = (104.0, 14.0, -150.0)
LESSER_TROCHANTER_SEMI_MM = (11.0, 10.0, 13.0)
SHAFT_TOP_MM = (118.0, 2.0, -125.0)  # shaft axis passes through these two points
SHAFT_BOTTOM_MM = (72.0, 8.0, -480.0)
SHAFT_TOP_Z_MM = -108.0  # the shaft cylinder starts here (inside the trochanteric region)
SHAFT_RADIUS_MM = 14.0
CORTEX_MM = 5.0


@dataclass(frozen=True)
class Keyframe:
    z: float
    u: float
    y: float
    a: float
    b: float
    rot_deg: float = 0.0
    anchor: str = "abs"


def _k(z: float, u: float, y: float, a: float, b: float, rot: float = 0.0, anchor: str = "abs") -> Keyframe:
    return Keyframe(z, u, y, a, b, rot, anchor)


def _f(z: float, u: float, y: float, a: float, b: float, rot: float = 0.0) -> Keyframe:
    return Keyframe(z, u, y, a, b, rot, "femur")


# Muscles by label key (left side). "erector_spinae" is unlabelled muscle (label 0).
MUSCLES: tuple[tuple[str, tuple[Keyframe, ...]], ...] = (
    ("abdominal_oblique", (
        _k(12, 126, -50, 10, 44, -25), _k(-5, 118, -62, 9, 32, -35), _k(-25, 108, -74, 6, 16, -50),
    )),
    ("rectus_abdominis", (
        _k(12, 32, -100, 27, 8), _k(-50, 27, -95, 22, 9), _k(-95, 20, -78, 15, 9), _k(-118, 14, -62, 10, 7),
    )),
    ("multifidus", (
        _k(12, 20, 74, 14, 19), _k(-30, 18, 86, 13, 8), _k(-70, 12, 93, 8, 5),
    )),
    ("erector_spinae", (
        _k(12, 50, 72, 20, 18, 20), _k(-20, 45, 86, 16, 9, 20),
    )),
    ("psoas", (
        _k(12, 47, 32, 18, 22, 10), _k(-30, 58, 15, 19, 21, 20), _k(-65, 66, -12, 17, 17), _k(-82, 70, -22, 14, 14),
    )),
    ("iliacus", (
        _k(5, 98, 14, 12, 34, -35), _k(-35, 98, 2, 16, 36, -40), _k(-65, 88, -15, 16, 24, -40), _k(-82, 82, -24, 14, 16),
    )),
    ("iliopsoas", (
        _k(-80, 76, -24, 22, 16), _k(-100, 78, -40, 22, 13, -10), _k(-125, 88, -34, 18, 14, -20),
        _k(-145, 96, -14, 15, 13), _k(-160, 100, 2, 11, 10),
    )),
    ("gluteus_medius", (
        _k(8, 146, 22, 10, 40, 30), _k(-30, 150, 14, 18, 48, 25), _k(-70, 147, 8, 20, 40, 15),
        _k(-100, 138, 8, 16, 26, 10), _k(-116, 132, 10, 10, 14),
    )),
    ("gluteus_minimus", (
        _k(-28, 135, 2, 9, 28, 20), _k(-60, 130, 2, 11, 30, 15), _k(-92, 120, -2, 10, 22, 10), _k(-110, 122, -8, 8, 10),
    )),
    ("gluteus_maximus", (
        _k(-18, 62, 100, 30, 14, -25), _k(-60, 95, 100, 52, 20, -30), _k(-110, 112, 82, 58, 24, -40),
        _k(-170, 118, 60, 46, 22, -55), _k(-215, 124, 42, 28, 14, -60), _k(-245, 128, 30, 12, 8, -60),
    )),
    ("tensor_fasciae_latae", (
        _k(-30, 128, -56, 11, 13), _k(-80, 140, -42, 13, 20, -30), _k(-140, 142, -28, 11, 18, -20),
        _k(-190, 138, -20, 7, 8),
    )),
    ("piriformis", (
        _k(-52, 52, 74, 18, 12, -35), _k(-72, 78, 58, 28, 12, -30), _k(-92, 102, 38, 22, 10, -25), _k(-104, 116, 28, 10, 7),
    )),
    ("obturator_internus", (
        _k(-92, 55, 18, 9, 24), _k(-115, 52, 14, 10, 28), _k(-140, 48, 12, 9, 22), _k(-152, 46, 10, 7, 12),
    )),
    ("obturator_externus", (
        _k(-122, 64, -10, 7, 12, 20), _k(-132, 68, -4, 10, 18, 25), _k(-145, 76, 8, 10, 16, 40), _k(-158, 86, 18, 7, 8, 40),
    )),
    ("quadratus_femoris", (
        _k(-136, 82, 40, 18, 8, -10), _k(-152, 82, 40, 22, 10, -10), _k(-172, 86, 38, 18, 9, -10),
    )),
    ("pectineus", (
        _k(-106, 52, -38, 12, 9, 20), _k(-125, 58, -36, 15, 11, 30), _k(-150, 68, -30, 15, 12, 40),
        _f(-178, -40, -22, 10, 9, 40),
    )),
    ("sartorius", (
        _k(-32, 124, -66, 11, 8, 30), _k(-90, 112, -66, 14, 10, 20), _f(-160, -4, -56, 16, 11, 10),
        _f(-250, -30, -44, 16, 12, 40), _f(-350, -48, -18, 13, 16, 60), _f(-440, -50, 16, 12, 16, 80),
        _f(-522, -44, 34, 11, 13, 80),
    )),
    ("rectus_femoris", (
        _k(-78, 108, -52, 9, 9), _k(-105, 110, -56, 13, 11), _f(-150, -4, -46, 18, 13),
        _f(-250, 0, -50, 24, 16), _f(-370, 2, -46, 19, 11), _f(-430, 0, -40, 13, 6), _f(-448, 0, -38, 10, 4),
    )),
    ("vastus_lateralis", (
        _f(-112, 16, 2, 9, 18), _f(-150, 24, -2, 16, 30, 10), _f(-220, 32, -4, 20, 38, 10),
        _f(-340, 33, 0, 18, 35, 5), _f(-430, 30, 4, 12, 22), _f(-472, 26, 6, 7, 10),
    )),
    ("vastus_intermedius", (
        _f(-135, 2, -20, 20, 10), _f(-220, 4, -22, 24, 12), _f(-330, 3, -22, 24, 13),
        _f(-420, 0, -24, 20, 10), _f(-452, 0, -24, 14, 6),
    )),
    ("vastus_medialis", (
        _f(-165, -16, -22, 9, 9), _f(-240, -22, -24, 14, 15), _f(-330, -26, -26, 19, 21),
        _f(-420, -30, -20, 27, 27), _f(-475, -32, -6, 22, 20), _f(-500, -30, 0, 12, 10),
    )),
    ("adductor_longus", (
        _k(-122, 24, -44, 11, 9, 30), _k(-150, 36, -40, 15, 12, 40), _f(-200, -58, -20, 19, 16, 40),
        _f(-270, -46, -12, 19, 17, 40), _f(-330, -36, -4, 12, 10, 40), _f(-345, -32, -2, 7, 6),
    )),
    ("adductor_brevis", (
        _k(-132, 32, -18, 10, 10), _k(-155, 42, -14, 14, 13, 30), _f(-200, -56, 2, 17, 13, 30),
        _f(-260, -42, 8, 14, 10, 30), _f(-278, -38, 8, 8, 6),
    )),
    ("adductor_magnus", (
        _k(-148, 48, 38, 14, 13), _k(-175, 54, 34, 22, 18, 20), _f(-220, -54, 28, 28, 21, 30),
        _f(-320, -40, 24, 28, 27, 30), _f(-420, -35, 14, 18, 17), _f(-465, -32, 6, 8, 8),
    )),
    ("gracilis", (
        _k(-138, 14, -30, 8, 12), _k(-170, 22, -24, 8, 13, 20), _f(-205, -66, 2, 8, 16, 10),
        _f(-260, -62, 8, 9, 17, 10), _f(-350, -54, 14, 9, 16, 15), _f(-470, -43, 26, 7, 10),
        _f(-522, -34, 36, 5, 6),
    )),
    ("semitendinosus", (
        _k(-150, 60, 56, 9, 9), _k(-180, 62, 58, 13, 12), _f(-230, -34, 56, 16, 14),
        _f(-380, -34, 52, 16, 14), _f(-470, -34, 46, 8, 8), _f(-522, -36, 42, 5, 5),
    )),
    ("semimembranosus", (
        _k(-155, 54, 46, 8, 8), _k(-190, 58, 44, 10, 9), _f(-260, -20, 44, 14, 12),
        _f(-400, -24, 42, 22, 18), _f(-480, -28, 30, 16, 15), _f(-522, -30, 22, 10, 10),
    )),
    ("biceps_femoris", (
        _k(-150, 68, 58, 10, 10), _k(-190, 74, 60, 13, 12), _f(-240, 4, 52, 16, 15),
        _f(-380, 18, 46, 22, 18), _f(-470, 34, 26, 14, 12), _f(-522, 40, 16, 10, 9),
    )),
)

UNLABELLED_MUSCLES = ("erector_spinae",)

# Body outline above the crotch: (z, half-width A, half-depth B, centre y).
BODY_OUTLINE: tuple[tuple[float, float, float, float], ...] = (
    (12.0, 174.0, 122.0, -8.0),
    (-50.0, 184.0, 118.0, -4.0),
    (-110.0, 192.0, 120.0, 6.0),
    (-160.0, 186.0, 114.0, 10.0),
    (-185.0, 160.0, 100.0, 14.0),
)

# Leg outline below the hip: (z, semi-axis along u, semi-axis along y); centre = femoral
# shaft axis + LEG_CENTER_OFFSET_MM.
LEG_OUTLINE: tuple[tuple[float, float, float], ...] = (
    (-100.0, 96.0, 100.0),
    (-200.0, 88.0, 92.0),
    (-300.0, 80.0, 84.0),
    (-420.0, 68.0, 70.0),
    (-522.0, 60.0, 58.0),
)
LEG_CENTER_OFFSET_MM = (-10.0, 12.0)

# Pelvic cavity (viscera, unlabelled): (z, centre y, half-width, half-depth).
PELVIC_CAVITY: tuple[tuple[float, float, float, float], ...] = (
    (12.0, -28.0, 100.0, 66.0),
    (-50.0, -14.0, 80.0, 58.0),
    (-100.0, -6.0, 42.0, 42.0),
    (-140.0, -8.0, 28.0, 28.0),
    (-152.0, -8.0, 12.0, 12.0),
)

# Ilium wing: quadratic Bezier (anterior point, control point, posterior point) in (u, y)
# per height, and plate thickness.
ILIUM_WING: tuple[tuple[float, tuple[float, float], tuple[float, float], tuple[float, float], float], ...] = (
    (4.0, (116.0, -48.0), (158.0, 20.0), (56.0, 74.0), 6.0),
    (-40.0, (126.0, -62.0), (152.0, 24.0), (48.0, 64.0), 6.0),
    (-70.0, (106.0, -40.0), (122.0, 12.0), (54.0, 52.0), 10.0),
    (-88.0, (96.0, -26.0), (106.0, 4.0), (74.0, 34.0), 16.0),
)

# Sacrum / L5 (unlabelled bone): (z, centre y, half-width, half-depth).
SACRUM: tuple[tuple[float, float, float, float], ...] = (
    (12.0, 34.0, 26.0, 20.0),
    (-8.0, 42.0, 40.0, 22.0),
    (-25.0, 52.0, 54.0, 24.0),
    (-70.0, 72.0, 44.0, 16.0),
    (-115.0, 92.0, 22.0, 9.0),
    (-140.0, 98.0, 9.0, 6.0),
)

# Pubic and ischial rami (unlabelled bone): segments ((u, y, z), (u, y, z), radius).
RAMI: tuple[tuple[tuple[float, float, float], tuple[float, float, float], float], ...] = (
    ((66.0, -22.0, -112.0), (6.0, -46.0, -126.0), 9.0),   # superior pubic ramus
    ((64.0, 24.0, -106.0), (56.0, 46.0, -152.0), 12.0),   # ischium body to tuberosity
    ((56.0, 46.0, -152.0), (10.0, -36.0, -146.0), 7.0),   # ischiopubic ramus
)
