"""Configuration: validation names the offending key, overrides resolve per experiment."""

import copy

import pytest

from dodlib.config import ConfigError, deep_merge, load_params, parse_params
from tests.conftest import REPO, repo_params_raw


def _error(raw) -> str:
    with pytest.raises(ConfigError) as info:
        parse_params(raw)
    return str(info.value)


def test_repository_params_are_valid():
    params = load_params(REPO / "params.yaml")
    assert "dod" in params.experiments and "sit" in params.experiments
    assert params.experiment("sit").lem.enabled is False
    assert params.experiment("dod").lem.enabled is True


@pytest.mark.parametrize(
    "patch, key",
    [
        ({"train": {"images": -5}}, "train.images"),
        ({"train": {"imagez": 5}}, "train.imagez"),
        ({"train": {"batch_size": "64"}}, "train.batch_size"),
        ({"lem": {"bottleneck_dim": 4096}}, "lem.bottleneck_dim"),
        ({"stages": {"count": 0}}, "stages.count"),
        ({"sample": {"sampler": {"method": "ddim"}}}, "sample.sampler.method"),
        ({"sample": {"sampler": {"num_steps": 0}}}, "sample.sampler.num_steps"),
        ({"lem": {"prior_dropout": 1.5}}, "lem.prior_dropout"),
        ({"model": {"size": "XXL"}}, "model.size"),
        ({"bogus": {}}, "bogus"),
        ({"experiments": {"x": {"train": {"lr": -1.0}}}}, "experiments.x.train.lr"),
        ({"experiments": {"x": {"data": {"resolution": 32}}}}, "experiments.x.data"),
        ({"experiments": {"x": {"weights_from": "nope"}}}, "experiments.x.weights_from"),
        ({"experiments": {"x": {"weights_from": "dod", "train": {"seed": 3}}}}, "experiments.x.train"),
        ({"model": {"patch_size": 3}}, "model.patch_size"),
        ({"stages": {"finetune": {"2": {"t0": 1.0}}}}, "stages.finetune.2.t0"),
        ({"stages": {"finetune": {"1": {}}}}, "stages.finetune.1"),
        ({"stages": {"finetune": {"3": {}}}}, "stages.finetune.3"),  # needs stage 2's pairs
        ({"experiments": {"x": {"stages": {"finetune": {"2": {"train": {"lr": -1}}}}}}},
         "experiments.x.stages.finetune.2.train.lr"),
        ({"experiments": {"x": {"lem": {"enabled": False}, "stages": {"finetune": {"2": {}}}}}},
         "experiments.x.stages.finetune"),
        ({"experiments": {"x": {"weights_from": "dod", "stages": {"finetune": {"2": {}}}}}},
         "experiments.x.stages.finetune"),
    ],
)
def test_invalid_values_name_their_key(patch, key):
    message = _error(deep_merge(repo_params_raw(), patch))
    assert message.startswith(key), message


def test_experiment_overrides_merge_deeply():
    raw = deep_merge(repo_params_raw(), {
        "experiments": {"cfg": {"weights_from": "dod", "stages": {"overrides": {"2": {"cfg": {"scale": 3.0}}}}}}
    })
    params = parse_params(raw)
    exp = params.experiment("cfg")
    assert exp.trainer == "dod"
    assert exp.stage_sampling(2).cfg.scale == 3.0
    assert exp.stage_sampling(1).cfg.scale == raw["sample"]["cfg"]["scale"]
    # the override replaced one value only; the rest of the block comes from the base
    assert exp.stage_sampling(2).cfg.schedule == raw["sample"]["cfg"]["schedule"]
    assert "cfg" not in params.trainers


def test_parse_does_not_mutate_input():
    raw = repo_params_raw()
    before = copy.deepcopy(raw)
    parse_params(raw)
    assert raw == before


def test_finetuned_stages_resolve_weights_images_and_borrowers():
    raw = deep_merge(repo_params_raw(), {"experiments": {
        "ft": {"stages": {"finetune": {"2": {"t0": 0.7, "train": {"images": 5000, "lr": 2e-4}}}}},
        "ft_cfg": {"weights_from": "ft", "stages": {"count": 3}},
    }})
    params = parse_params(raw)
    ft, borrower, dod = params.experiment("ft"), params.experiment("ft_cfg"), params.experiment("dod")
    assert ft.stages.finetuned() == [2] and dod.stages.finetuned() == []
    assert [ft.weights_stage(k) for k in (1, 2, 3)] == [1, 2, 2]  # stage 3 samples stage 2's network
    assert [borrower.weights_stage(k) for k in (1, 2, 3)] == [1, 2, 2]  # the owner's networks
    tuned = ft.finetune_train(2)
    assert (tuned.images, tuned.lr, tuned.batch_size) == (5000, 2e-4, ft.train.batch_size)
    assert tuned.snapshots == []  # not inherited from stage 1
    assert ft.train_images(1) == ft.train.images and ft.train_images(3) == ft.train.images + 5000
