import math

import torch
import torch.nn.functional as F

from workers.eval.perplexity import perplexity, perplexity_of_ids
from workers.eval.texts import calibration_text, calibration_windows, windows


class CharTokenizer:
    """Maps each character to an id in [3, 128): enough to exercise text -> ids -> perplexity."""

    def encode(self, text, add_special_tokens=False):
        return [3 + ord(c) % 125 for c in text]


def test_calibration_text_is_bundled_prose():
    text = calibration_text()
    assert 6_000 <= len(text.encode()) <= 10_000
    assert len(text.split("\n\n")) >= 10


def test_windows_do_not_overlap_and_cover_the_ids():
    ids = torch.arange(10)
    parts = windows(ids, 4)
    assert [p.shape for p in parts] == [(1, 4), (1, 4), (1, 2)]
    assert torch.equal(torch.cat([p[0] for p in parts]), ids)
    assert len(windows(torch.arange(9), 4)) == 2  # a lone last token predicts nothing and is dropped
    assert len(windows(ids, 4, max_windows=1)) == 1


def test_perplexity_is_exp_of_mean_token_nll(tiny):
    ids = torch.randint(3, 128, (70,), generator=torch.Generator().manual_seed(1))
    total, count = 0.0, 0
    with torch.no_grad():
        for w in windows(ids, 32):
            logits = tiny(w).logits[0, :-1]
            total += F.cross_entropy(logits, w[0, 1:], reduction="sum").item()
            count += w.shape[1] - 1
    assert math.isclose(perplexity_of_ids(tiny, ids, seq_len=32), math.exp(total / count), rel_tol=1e-5)


def test_full_depth_exit_gives_the_full_model_perplexity_and_shallower_differs(tiny):
    text = calibration_text()[:400]
    full = perplexity(tiny, CharTokenizer(), text, seq_len=64)
    assert math.isclose(perplexity(tiny, CharTokenizer(), text, seq_len=64, depth=4), full, rel_tol=1e-5)
    assert not math.isclose(perplexity(tiny, CharTokenizer(), text, seq_len=64, depth=2), full, rel_tol=1e-3)


def test_calibration_windows_use_the_calibration_text():
    parts = calibration_windows(CharTokenizer(), seq_len=128, max_windows=3)
    assert len(parts) == 3 and all(p.shape == (1, 128) for p in parts)
    assert parts[0][0, 0].item() == 3 + ord(calibration_text()[0]) % 125


def test_instruction_windows_concatenate_the_chat_rendered_instruction_set():
    from tests.generation.conftest import character_tokenizer
    from tests.train.conftest import CHAT_TEMPLATE
    from workers.eval.texts import instruction_windows
    from workers.train.data import encode_records, read_jsonl, shipped_data_path

    tokenizer = character_tokenizer()
    tokenizer.chat_template = CHAT_TEMPLATE
    parts = instruction_windows(tokenizer, seq_len=512)
    records = read_jsonl(shipped_data_path())
    expected = [t for example in encode_records(tokenizer, records[:2]) for t in example.input_ids]
    assert torch.cat([p[0] for p in parts])[: len(expected)].tolist() == expected
    assert len(parts) > 100 and all(p.shape == (1, 512) for p in parts[:-1])
