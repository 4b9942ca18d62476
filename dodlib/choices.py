"""The names of every open choice in params.yaml, one tuple each, declared once.

The config validates params.yaml against these names, and each implementing module keys its
registry (name -> implementation) by the same tuple and checks at import that the two agree
(`check_registry`): a name without an implementation, or an implementation without a name, fails
on the first import with a message that says which. They live here, apart from the torch code that
implements them, because the config is read before torch may be imported (Snakemake's process
parses it for every DAG; the `dod` CLI pins the numerical runtime, dodlib/runtime.py, first).

Choices implemented by torch-free modules stay there: precisions in dodlib/compute.py, CPU ISAs in
dodlib/runtime.py.
"""

from __future__ import annotations

from collections.abc import Iterable

# data (dodlib/data/prepare.py)
DATA_SOURCES = ("mnist-embedded", "imagefolder")
# tokenizer (dodlib/tokenizers.py)
TOKENIZERS = ("pixels", "sd-vae")
# backbone sizes (dodlib/models/sizes.py; S/B/L/XL as SiT/DiT, tiny/small for the CPU)
MODEL_SIZES = ("tiny", "small", "S", "B", "L", "XL")
# the prior's encoder (dodlib/models/lem.py) and where its output enters the backbone (dodlib/models/dod.py)
LEM_KINDS = ("lem", "direct")
INJECTIONS = ("add_tokens", "add_condition", "concat_tokens")
# the training distribution of t (dodlib/transport.py)
T_SAMPLINGS = ("uniform", "logit_normal")
# samplers (dodlib/samplers.py)
SAMPLERS = ("euler", "heun", "euler_maruyama")
# classifier-free guidance (dodlib/guidance.py)
CFG_SCHEDULES = ("constant", "interval", "power_cosine")
CFG_CHANNELS = ("all", "first3")
CFG_UNCOND = ("class", "class_prior")
# where the prior of stage 2 comes from (dodlib/sample.py)
PRIOR_SOURCES = ("generated", "real")
# the evaluation's detector (dodlib/evaluation.py)
DETECTORS = ("features", "inception")


def check_registry(what: str, names: tuple[str, ...], registry: Iterable[str]) -> None:
    """Raise unless `registry` has exactly one entry per name of `names`."""
    keys = tuple(registry)
    missing, extra = sorted(set(names) - set(keys)), sorted(set(keys) - set(names))
    if missing or extra:
        raise ImportError(f"{what}: the registry and dodlib/choices.py disagree "
                          f"(no implementation: {missing or 'none'}; not declared: {extra or 'none'})")


__all__ = ["CFG_CHANNELS", "CFG_SCHEDULES", "CFG_UNCOND", "DATA_SOURCES", "DETECTORS", "INJECTIONS", "LEM_KINDS",
           "MODEL_SIZES", "PRIOR_SOURCES", "SAMPLERS", "TOKENIZERS", "T_SAMPLINGS", "check_registry"]
