"""One round of ``bench_peers.py`` in one implementation's own environment; prints its figures as JSON.

    python benchmarks/peer_worker.py ours|ours-fast|matgl WORK.json

Runs with the interpreter of that implementation's virtual environment, so it
imports nothing of this project but for ``ours``. WORK.json names the CIF
files and the training batches (indices into them). Every implementation does
the same work, on one thread:

    graphs  parsed pymatgen Structures -> graphs at a 4 Å cutoff (structures/s)
    infer   batched forward of MEGNet, 256 structures a batch, no gradient (structures/s)
    step    one training step at batch 8 (ms): collate, MEGNet up to its 16-d features, the ParAIsite head
            16-450-350-350-1, the back-transform 10^(z s + m) - 1, MAPE, backward, Adam

``matgl`` is matgl's MEGNet: its PyG implementation from matgl 2 on (4.1.2
here), the DGL one before (1.2.1 with DGL 2.1, upstream ParAIsite's stack).
"""
from __future__ import annotations

import json
import sys
import time
import warnings

import torch
from torch import nn

torch.set_num_threads(1)
warnings.simplefilter("ignore")


def head() -> nn.Sequential:
    return nn.Sequential(nn.Linear(16, 450), nn.ReLU(), nn.Linear(450, 350), nn.ReLU(), nn.Linear(350, 350), nn.ReLU(),
                         nn.Linear(350, 1))


def mape_of(z: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    pred = torch.pow(10.0, torch.clamp(z * 0.6 + 0.9, max=6.0)) - 1
    return ((y - pred).abs() / y.abs().clamp(min=1e-8)).mean()


class Ours:
    name = "megnet_pt (this project)"

    def __init__(self, fast: bool = False) -> None:
        from megnet_pt import MEGNet, structure_to_graph
        from megnet_pt.fast import set_fast
        from megnet_pt.model import collate
        from paraisite.model import ParAIsite
        from paraisite.training.steps import adam

        self.to_graph, self.collate = structure_to_graph, collate  # collate: as train.py's step and predict()
        self.megnet = MEGNet()
        self.model = set_fast(ParAIsite(MEGNet()), fast)
        set_fast(self.megnet, fast)
        if fast:
            self.name += ", fast step"
        self.optimizer = adam([(n, p) for n, p in self.model.named_parameters() if p.requires_grad], 1e-3)

    def graph(self, structure):
        return self.to_graph(structure, cutoff=4.0)

    def infer(self, graphs) -> None:
        with torch.no_grad():
            self.megnet(self.collate(graphs))

    def step(self, graphs, y) -> None:
        self.model.train()
        loss = mape_of(self.model(self.collate(graphs)), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


class Matgl:
    def __init__(self) -> None:
        import matgl
        from matgl.models import MEGNet

        self.version = matgl.__version__
        self.dgl = int(self.version.split(".")[0]) < 2
        self.name = f"matgl {self.version} ({'DGL' if self.dgl else 'PyG'})"
        if self.dgl:
            import dgl

            self.dgl_module = dgl
            from matgl.ext.pymatgen import Structure2Graph
            from matgl.layers import BondExpansion

            expansion = BondExpansion(rbf_type="Gaussian", initial=0.0, final=5.0, num_centers=100, width=0.5)
            kwargs = dict(bond_expansion=expansion)
        else:
            from torch_geometric.data import Batch
            from matgl.ext.pymatgen import Structure2Graph

            self.Batch = Batch
            kwargs = dict(gauss_width=0.5)
        config = dict(dim_node_embedding=16, dim_edge_embedding=100, dim_state_embedding=2, nblocks=3,
                      hidden_layer_sizes_input=(64, 32), hidden_layer_sizes_conv=(64, 64, 32), nlayers_set2set=1,
                      niters_set2set=2, hidden_layer_sizes_output=(32, 16), is_classification=False,
                      activation_type="softplus2", cutoff=4.0, **kwargs)
        self.megnet = MEGNet(**config)
        self.model = MEGNet(**config)
        # the ParAIsite architecture: the output MLP up to its 16-d features (160->32, act, 32->16), then the head
        layers = list(self.model.output_proj.layers)[:3] + list(head())
        self.model.output_proj.layers = nn.ModuleList(layers)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)  # as upstream: torch's default Adam
        self.converter = Structure2Graph(element_types=self.model.element_types, cutoff=4.0)

    def graph(self, structure):
        g, lat, state = self.converter.get_graph(structure)
        if self.dgl:
            g.edata["pbc_offshift"] = torch.matmul(g.edata["pbc_offset"], lat[0])
            g.ndata["pos"] = g.ndata["frac_coords"] @ lat[0]
        else:
            g.pbc_offshift = torch.matmul(g.pbc_offset, lat[0])
            g.pos = g.frac_coords @ lat[0]
        return g, torch.as_tensor(state, dtype=torch.float32)

    def _batch(self, graphs):
        states = torch.stack([s for _, s in graphs])
        if self.dgl:
            return self.dgl_module.batch([g for g, _ in graphs]), states
        return self.Batch.from_data_list([g for g, _ in graphs]), states

    def infer(self, graphs) -> None:
        g, states = self._batch(graphs)
        with torch.no_grad():
            self.megnet(g, states)

    def step(self, graphs, y) -> None:
        self.model.train()
        g, states = self._batch(graphs)
        loss = mape_of(self.model(g, states), y)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def main() -> None:
    impl, work_path = sys.argv[1], sys.argv[2]
    work = json.loads(open(work_path).read())
    from pymatgen.core import Structure

    structures = [Structure.from_file(f) for f in work["cifs"]]
    y = torch.tensor(work["labels"], dtype=torch.float32)
    bench = Ours(fast=impl == "ours-fast") if impl.startswith("ours") else Matgl()
    for s in structures[:50]:  # warm-up: lazy imports and first-call set-up
        bench.graph(s)
    t0 = time.perf_counter()
    graphs = [bench.graph(s) for s in structures[: work["n_graphs"]]]
    t_graphs = time.perf_counter() - t0
    graphs += [bench.graph(s) for s in structures[work["n_graphs"] :]]
    n_infer = work["n_infer"]
    bench.infer(graphs[:256])  # warm-up: first-call allocations and lazy initialisation
    t0 = time.perf_counter()
    for a in range(0, n_infer, 256):
        bench.infer(graphs[a : min(a + 256, n_infer)])
    t_infer = time.perf_counter() - t0
    batches = work["batches"]
    for idx in batches[: work["warmup"]]:
        bench.step([graphs[i] for i in idx], y[idx])
    t0 = time.perf_counter()
    for idx in batches[work["warmup"] :]:
        bench.step([graphs[i] for i in idx], y[idx])
    t_step = (time.perf_counter() - t0) / (len(batches) - work["warmup"])
    print(json.dumps({"name": bench.name, "graphs_per_s": work["n_graphs"] / t_graphs, "infer_per_s": n_infer / t_infer,
                      "step_ms": 1000 * t_step}))


if __name__ == "__main__":
    main()
