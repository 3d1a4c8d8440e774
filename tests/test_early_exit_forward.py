import torch

from tests.tiny_models import make_tiny_llama
from workers.early_exit.forward import exit_logits, hidden_at_exits


def test_full_depth_exit_equals_transformers_forward(tmp_path):
    model = make_tiny_llama(tmp_path / "m")
    ids = torch.randint(3, 128, (2, 10))
    with torch.no_grad():
        ours = exit_logits(model, ids, depth=4)
        theirs = model(ids).logits
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_exit_k_equals_a_model_cut_to_k_layers(tmp_path):
    model = make_tiny_llama(tmp_path / "m")
    ids = torch.randint(3, 128, (1, 7))
    cut = make_tiny_llama(tmp_path / "c", num_hidden_layers=2)
    cut.load_state_dict(
        {k: v for k, v in model.state_dict().items() if "layers.2" not in k and "layers.3" not in k}
    )
    with torch.no_grad():
        torch.testing.assert_close(exit_logits(model, ids, 2), cut(ids).logits, rtol=1e-5, atol=1e-5)
        exits = hidden_at_exits(model, ids, [1, 2, 4])
    assert sorted(exits) == [1, 2, 4]
