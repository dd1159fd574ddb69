import pytest

from swamla.data import DataConfig, DataError


def test_defaults_and_coercion():
    cfg = DataConfig(source="files", train_paths=["a.jsonl"], val_paths="v.jsonl")
    assert cfg.train_paths == ("a.jsonl",) and cfg.val_paths == ("v.jsonl",)
    assert DataConfig().source == "fineweb-edu"


@pytest.mark.parametrize("kwargs, message", [
    ({"source": "web"}, "source must be one of"),
    ({"source": "files"}, "needs train_paths"),
    ({"val_fraction": 1.0}, "val_fraction"),
    ({"num_workers": -1}, "num_workers"),
    ({"prefetch": 0}, "prefetch"),
    ({"text_unit": "page"}, "text_unit"),
    ({"shuffle": "yes"}, "shuffle"),
    ({"train_paths": [1]}, "train_paths"),
])
def test_bad_values_name_the_field(kwargs, message):
    with pytest.raises(DataError, match=message):
        DataConfig(**kwargs)


def test_unknown_fields_are_named():
    with pytest.raises(DataError, match="unknown data config field.*'batchsize'"):
        DataConfig.from_dict({"batchsize": 3})
    with pytest.raises(DataError, match="'shufle'"):
        DataConfig().replace(shufle=False)
    with pytest.raises(TypeError, match="shufle"):
        DataConfig(shufle=False)
