"""The fast step (megnet_pt.fast): its written-out backward against autograd."""
from __future__ import annotations

import copy

import pytest
import torch
from torch.autograd.gradcheck import GradcheckError

from megnet_pt import MEGNet, structure_to_graph
from megnet_pt.fast import MLPFunction, set_fast
from megnet_pt.model import collate
from paraisite.model import ParAIsite


def _params(dims: list[int]) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    out = []
    for a, b in zip(dims[:-1], dims[1:]):
        out += [torch.randn(b, a, generator=g, dtype=torch.float64, requires_grad=True),
                torch.randn(b, generator=g, dtype=torch.float64, requires_grad=True)]
    return out


@pytest.mark.parametrize("activation", ["softplus2", "relu"])
@pytest.mark.parametrize("activate_last,activate_input", [(True, False), (False, False), (True, True)])
def test_mlp_function_passes_gradcheck(activation: str, activate_last: bool, activate_input: bool) -> None:
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    params = _params([5, 6, 4, 3])
    assert torch.autograd.gradcheck(lambda x, *p: MLPFunction.apply(x, activation, activate_last, activate_input, *p),
                                    (x, *params))


def test_gradcheck_catches_a_wrong_backward(monkeypatch: pytest.MonkeyPatch) -> None:
    """The check above would fail if the backward were wrong: here the activation's derivative is dropped."""
    import megnet_pt.fast as fast

    monkeypatch.setattr(fast, "_softplus2_and_slope", lambda z: (torch.nn.functional.softplus(z) - fast.LOG2,
                                                                 torch.ones_like(z)))
    x = torch.randn(7, 5, dtype=torch.float64, requires_grad=True)
    with pytest.raises(GradcheckError):
        torch.autograd.gradcheck(lambda x, *p: MLPFunction.apply(x, "softplus2", True, False, *p), (x, *_params([5, 6, 3])))


def test_fast_model_has_the_plain_models_outputs_and_gradients(shared) -> None:
    from pymatgen.core import Structure

    from paraisite.data.datasets import dataset_folder, read_labels

    folder = dataset_folder("togo15")
    ids = read_labels(folder / "labels.csv")[0][:6]
    torch.manual_seed(0)
    plain = ParAIsite(MEGNet()).double()
    fast = set_fast(copy.deepcopy(plain))
    batch = collate([structure_to_graph(Structure.from_file(folder / "cif" / f"{i}.cif")) for i in ids])
    batch.edge_dist, batch.state = batch.edge_dist.double(), batch.state.double()
    grads = []
    for model in (plain, fast):
        out = model(batch)
        (out ** 2).sum().backward()
        grads.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
    torch.testing.assert_close(grads[1][0], grads[0][0], rtol=1e-9, atol=1e-9)
    for name, g in grads[0][1].items():
        torch.testing.assert_close(grads[1][1][name], g, rtol=1e-7, atol=1e-9, msg=name)
