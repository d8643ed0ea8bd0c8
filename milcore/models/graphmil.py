"""Graph MIL: message passing on a per-bag k-nearest-neighbour cell graph, then attention readout.

References:
    Tu, Huang, He, Zhou. "Multiple instance learning with graph neural networks." ICML 2019 workshop.
    Li, Yang, Chen, et al. "Graph CNN for Survival Analysis on Whole Slide Pathological Images."
    MICCAI 2018 (instance graphs from patch features / positions).
    Layers from PyTorch Geometric: GCN (Kipf & Welling 2017), GAT (Velickovic et al. 2018),
    GIN (Xu et al. 2019).

Per bag: a directed kNN graph (each cell receives messages from its ``k`` nearest cells of the same bag)
built in **spatial coordinates when given** (``coords``; ``graph_space="auto"``) or else in the input
**feature space**; ``num_layers`` residual GCN/GAT/GIN layers on the instance embeddings; gated attention
readout (Ilse et al. 2018) pooled within each bag. Edges never cross bags, so a bag scores the same alone
or in a batch. Permutation invariant (up to kNN ties and float summation order). The kNN search is
computed blockwise (memory linear in the bag size, compute quadratic), see
:func:`milcore.ops.knn_graph`. torch-geometric is imported when a model is built, not at import time.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from feature_cache.errors import InvalidArgumentError
from milcore.models.base import AggregatorConfig, MILAggregator, check_choice, check_range
from milcore.models.layers import GatedAttention, autocast_input, instance_embedding, resize_linear
from milcore.models.output import MILOutput
from milcore.models.registry import register_aggregator
from milcore.models.search import SearchDim, declare_space
from milcore.ops import knn_graph, segment_softmax, weighted_segment_sum

__all__ = ["GraphMIL", "GraphMILConfig"]


@dataclass(frozen=True)
class GraphMILConfig(AggregatorConfig):
    """Graph MIL hyper-parameters.

    Attributes:
        embed_dim: node embedding width.
        conv: ``"gcn"``, ``"gat"`` or ``"gin"``.
        num_layers: message-passing layers (each residual: ``h + ReLU(conv(h))``).
        k: neighbours per cell in the kNN graph.
        graph_space: ``"auto"`` (coords when given, else features), ``"features"`` or ``"coords"``.
        heads: attention heads of GAT layers (``embed_dim`` must be divisible by it).
        attention_dim: hidden width of the gated-attention readout.
        dropout: dropout after the embedding.
    """

    embed_dim: int = 128
    conv: str = "gin"
    num_layers: int = 2
    k: int = 8
    graph_space: str = "auto"
    heads: int = 4
    attention_dim: int = 128
    dropout: float = 0.0

    def validate(self) -> None:
        super().validate()
        check_range("embed_dim", self.embed_dim, 1, integer=True)
        check_choice("conv", self.conv, ("gcn", "gat", "gin"))
        check_range("num_layers", self.num_layers, 1, integer=True)
        check_range("k", self.k, 1, integer=True)
        check_choice("graph_space", self.graph_space, ("auto", "features", "coords"))
        check_range("heads", self.heads, 1, integer=True)
        if self.conv == "gat" and self.embed_dim % self.heads:
            raise InvalidArgumentError(f"embed_dim ({self.embed_dim}) must be divisible by heads ({self.heads})")
        check_range("attention_dim", self.attention_dim, 1, integer=True)
        check_range("dropout", self.dropout, 0.0, 0.99)


def _make_conv(config: GraphMILConfig) -> nn.Module:
    from torch_geometric.nn import GATConv, GCNConv, GINConv  # heavy import, only when a model is built

    e = config.embed_dim
    if config.conv == "gcn":
        return GCNConv(e, e)
    if config.conv == "gat":
        return GATConv(e, e // config.heads, heads=config.heads)
    return GINConv(nn.Sequential(nn.Linear(e, e), nn.ReLU(), nn.Linear(e, e)), train_eps=True)


@register_aggregator("graphmil", config=GraphMILConfig)
class GraphMIL(MILAggregator):
    """GNN on per-bag kNN cell graphs (GCN/GAT/GIN, torch-geometric) with gated-attention readout."""

    uses_coords = True  # the kNN graph is built in cell coordinates when the bank has them
    search_space = declare_space(
        embed_dim=SearchDim(choices=(64, 128, 256)),  # multiples of GAT's heads
        conv=SearchDim(choices=("gin", "gcn", "gat")),
        num_layers=SearchDim(1, 3),
        k=SearchDim(4, 16),
    )

    def __init__(self, config: GraphMILConfig) -> None:
        super().__init__(config)
        self.embed = instance_embedding(config.in_dim, config.embed_dim, config.dropout)
        self.convs = nn.ModuleList([_make_conv(config) for _ in range(config.num_layers)])
        width = config.embed_dim * (config.num_layers + 1)
        self.attention = GatedAttention(width, config.attention_dim, 1, gated=True)
        self.head = nn.Linear(width, config.num_classes)

    def pool(self, x: Tensor, ptr: Tensor, index: Tensor, coords: Tensor | None, labels: Tensor | None) -> MILOutput:
        space = self.config.graph_space
        if space == "coords" and coords is None:
            raise InvalidArgumentError("graphmil: graph_space='coords' needs coords (N, 2)")
        pos = coords if coords is not None and space != "features" else x  # (N, F)
        edge_index = knn_graph(pos, ptr, self.config.k)  # (2, E)
        h = self.embed(autocast_input(x))  # (N, E)
        layers = [h]
        for conv in self.convs:
            h = h + conv(h, edge_index).relu()  # (N, E)
            layers.append(h)
        h = torch.cat(layers, dim=1)  # (N, E * (L + 1)) jumping knowledge
        scores = self.attention(h)  # (N, 1)
        att = segment_softmax(scores, ptr, index)  # (N, 1)
        embedding = weighted_segment_sum(h, att, ptr, index)[:, 0]  # (B, E)
        return MILOutput(self.head(embedding), att[:, 0], embedding)

    def _resize_head(self, num_classes: int) -> None:
        self.head = resize_linear(self.head, num_classes)
