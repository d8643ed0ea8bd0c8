"""Segment operations over ``ptr`` offsets (bags as row ranges of one matrix) and a depthwise convolution."""

from milcore.ops.depthwise import depthwise_conv2d
from milcore.ops.knn import knn_graph
from milcore.ops.segment import (
    from_padded,
    pairwise_padding_pays,
    ptr_to_index,
    ptr_to_sizes,
    segment_argmax,
    segment_inner,
    segment_max,
    segment_mean,
    segment_softmax,
    segment_sum,
    segment_topk,
    to_padded,
    weighted_segment_sum,
)

__all__ = [
    "depthwise_conv2d",
    "from_padded",
    "knn_graph",
    "pairwise_padding_pays",
    "ptr_to_index",
    "ptr_to_sizes",
    "segment_argmax",
    "segment_inner",
    "segment_max",
    "segment_mean",
    "segment_softmax",
    "segment_sum",
    "segment_topk",
    "to_padded",
    "weighted_segment_sum",
]
