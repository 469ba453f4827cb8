"""Every name the .nkv format defines, in one place (spec/nkv-format.md is normative).

Change a value here only together with the spec and a version bump.
"""

from __future__ import annotations

FORMAT_MARKER = "nkv"
FORMAT_VERSION = "2.2"  # "major.minor" of this spec; readers refuse a newer major
# Writers write the lowest version whose parts the file uses (spec §8):
SIGN_VERSION = "2.2"  # K1 as signs of rotated keys + per-row weights, R1 as rotated int4 (spec §4.4)
RESIDUAL_SITE_VERSION = "2.0"  # rows added after the FFN-output norm (§5): a 1.x reader would add them before it
INT8_VERSION = "1.3"  # K1/R1 stored as I8 with per-row scales (spec §4.3)
FINGERPRINT2_VERSION = "1.2"  # the base fingerprint is nkvfp2 (spec §6)
SKETCH_VERSION = "1.1"  # the file holds the sketch projection (spec §4.2)
BASE_VERSION = "1.0"  # no part added after 1.0
SUPPORTED_MAJOR = 2

# Tensors ---------------------------------------------------------------------------
T_KEYS = "nkv.keys"  # K1, [n_facts, d_key]
T_RESIDUALS = "nkv.residuals"  # R1, [n_facts, d_model]
T_FACTS = "nkv.facts"  # U8 [n_bytes]: UTF-8 JSON Lines, one fact record per row
ROW_DTYPES = ("F32", "F16", "BF16")
# Optional (1.1): a projection fitted to the keys for the sketch path of the gate (spec §5.1)
T_SKETCH_PROJ = "nkv.sketch.proj"  # F32, [d_key, d_sketch]
# Optional (2.1), only beside the projection: the keys' sketches under it, which a reader would
# otherwise compute at load (gate.sketch_keys). A cache: it raises no file's version (spec §8).
T_SKETCH_KEYS = "nkv.sketch.keys"  # F32, [n_facts, d_sketch + 1]
OPTIONAL_TENSORS = (T_SKETCH_PROJ, T_SKETCH_KEYS)
SKETCH_KEYS_TOLERANCE = 1e-4  # |stored - computed| per value a reader accepts (float32 products differ by BLAS)
SKETCH_KEYS_CHECKED = 64  # evenly spaced rows the reference reader recomputes to check nkv.sketch.keys
# Int8 storage (1.3): K1 and R1 both I8, each row dequantized as float32(q) * scale (spec §4.3)
QUANT_DTYPE = "I8"
T_KEYS_SCALE = "nkv.keys.scale"  # F32, [n_facts]
T_RESIDUALS_SCALE = "nkv.residuals.scale"  # F32, [n_facts]
SCALE_TENSORS = (T_KEYS_SCALE, T_RESIDUALS_SCALE)
QUANT_MAX = 127  # |q| <= 127 (symmetric: -128 is not used); a row with a scale > 0 reaches it
# Sign storage (2.2): K1 as U8 [n_facts, ceil(d_key / 8)] sign bits of the rotated keys, with a
# per-row score weight; R1 as U8 [n_facts, ceil(d_model / 2)] rotated int4 with its scales (spec §4.4)
SIGN_DTYPE = "U8"
T_KEYS_WEIGHT = "nkv.keys.weight"  # F32, [n_facts]: multiplies the gate's cosine with the row's key
INT4_MAX = 7  # |q| <= 7 (-8 is not used); a residual row with a scale > 0 reaches it
SIGN_WEIGHT_SLACK = 1e-3  # a weight is 0 or in [1, sqrt(d_key)] within this relative slack (float32 sums)
STORAGES = ("exact", "int8", "sign")  # K1/R1 in their float dtype, I8 + scales (1.3), or signs + int4 (2.2)
MIN_SCALE = 2.0**-126  # the smallest normal float32: a nonzero scale is normal, so q * scale is exact enough

# Metadata keys (all values are strings) --------------------------------------------
K_FORMAT = "nkv.format"
K_VERSION = "nkv.version"
K_N_FACTS = "nkv.n_facts"
K_LAYER = "nkv.layer"
K_GAMMA = "nkv.gamma"
K_BASE_NAME = "nkv.base.name"
K_BASE_REVISION = "nkv.base.revision"
K_BASE_ARCH = "nkv.base.architecture"
K_BASE_MODEL_TYPE = "nkv.base.model_type"
K_BASE_N_LAYERS = "nkv.base.n_layers"
K_BASE_D_MODEL = "nkv.base.d_model"
K_BASE_D_KEY = "nkv.base.d_key"
K_BASE_FINGERPRINT = "nkv.base.fingerprint"
K_TARGET_MODULE = "nkv.target_module"
K_RESIDUAL_SITE = "nkv.residual_site"  # where a row is added (spec §5); absent = "output"
K_BUILD = "nkv.build"  # JSON object: tool, method, config, layer choice, templates, losses, self_check
K_EVAL = "nkv.eval"  # JSON object: evaluation results, if any

REQUIRED_KEYS = (
    K_FORMAT,
    K_VERSION,
    K_N_FACTS,
    K_LAYER,
    K_GAMMA,
    K_BASE_NAME,
    K_BASE_ARCH,
    K_BASE_MODEL_TYPE,
    K_BASE_N_LAYERS,
    K_BASE_D_MODEL,
    K_BASE_D_KEY,
    K_BASE_FINGERPRINT,
    K_TARGET_MODULE,
)
OPTIONAL_KEYS = (K_BASE_REVISION, K_RESIDUAL_SITE, K_BUILD, K_EVAL)
# Residual sites (spec §5): to the output projection's output, or (2.0) to the output of the
# norm the block applies to the FFN's output (Gemma 2/3, OLMo 2/3: post_feedforward_layernorm)
RESIDUAL_SITES = ("output", "out_norm")
DEFAULT_RESIDUAL_SITE = "output"

# Fact records (one JSON object per line of nkv.facts) ---------------------------------
FACT_REQUIRED_FIELDS = ("id", "subject", "prompt", "target_new")
FACT_OPTIONAL_FIELDS = ("target_true", "provenance")

# Reader limits ---------------------------------------------------------------------
MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors limit
DEFAULT_GAMMA = 0.65  # paper, all models

# Sketch path of the gate (spec §5.1); serving choices, not stored in the file ----------
DEFAULT_SKETCH_DIM = 128  # d_sketch of a fitted projection (64 missed rows on real keys)
DEFAULT_SHORTLIST = 128  # candidates per token rescored exactly
SKETCH_REST_WEIGHT = 0.6  # the shortlist ranks by sketch product + this x the rests' norms (spec §5.1)
SKETCH_MIN_FACTS = 16384  # loaders take the sketch path from this many facts (capacity) up
