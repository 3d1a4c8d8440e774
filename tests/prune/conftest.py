import pytest
import torch

from tests.tiny_models import make_tiny_llama, make_tiny_qwen2


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny random LlamaForCausalLM (4 layers, hidden 64, 4 heads / 2 KV heads, MLP 128, vocab 128)."""
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "m", seed=0)


@pytest.fixture(scope="module")
def tiny_qwen2():
    """A tiny Qwen2 (q/k/v biases, config.layer_types present) of the same shape as `tiny`."""
    return make_tiny_qwen2(seed=1)


@pytest.fixture(scope="module")
def calibration():
    """Four (1, 32) windows of random token ids, fixed by seed."""
    generator = torch.Generator().manual_seed(0)
    return [torch.randint(3, 128, (1, 32), generator=generator) for _ in range(4)]


@pytest.fixture(autouse=True, scope="package")
def one_thread():
    """Tiny models run fastest on one thread (and do not stall when the machine is busy)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
