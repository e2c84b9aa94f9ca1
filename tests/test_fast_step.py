"""The fast step (megnet_pt.fast): its written-out backward against autograd."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from megnet_pt import MEGNet, structure_to_graph
from megnet_pt.fast import ACTIVATIONS, fast_ops, set_fast
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
    code = ACTIVATIONS.index(activation)
    assert torch.autograd.gradcheck(lambda x, *p: fast_ops().mlp(x, list(p), code, activate_last, activate_input),
                                    (x, *params))


def test_float32_softplus2_kernel_matches_torch() -> None:
    """The float32 kernel (its own exponential and logarithm) against torch's softplus and sigmoid, and its slope
    as the backward reads it: the gradient of sum(MLP) through one activated layer of identity weights."""
    z = torch.cat([torch.linspace(-90, 90, 20001), torch.randn(10000) * 3, torch.tensor([0.0, -0.0, 1e-8, -1e-8])])
    want = torch.nn.functional.softplus(z.double()) - math.log(2.0)
    torch.testing.assert_close(fast_ops().softplus2(z).double(), want, rtol=2e-7, atol=2e-7)
    x = z.view(-1, 1).requires_grad_()
    one, zero = torch.ones(1, 1), torch.zeros(1)
    fast_ops().mlp(x, [one, zero], 0, True, False).sum().backward()
    torch.testing.assert_close(x.grad.view(-1).double(), torch.sigmoid(z.double()), rtol=1e-6, atol=1e-7)


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
