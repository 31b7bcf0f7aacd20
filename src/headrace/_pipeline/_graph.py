"""The immutable description of a pipeline: a graph of nodes built by the fluent API.

A :class:`~headrace.Pipeline` is a handle on its last node. Nodes are never mutated,
so ``p.map(f)`` and ``p.map(g)`` share ``p``'s nodes; each run builds its own tasks
and channels from the graph (see ``_runtime``).
"""

from __future__ import annotations

from collections.abc import AsyncIterable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .._retry import Retry
from ._executors import Executor
from ._stats import FailedItem, OnError

__all__ = ["MergeNode", "Node", "SourceNode", "StageNode", "StageSpec", "TeeBranch", "TeeNode"]


@dataclass(frozen=True, slots=True, eq=False)
class StageSpec:
    """One stage's configuration, validated by the fluent method that made it."""

    kind: str  # "map", "filter", "flat_map", "batch", "unbatch", "rate_limit"
    name: str | None
    fn: Callable[[Any], Any] | None = None
    workers: int = 1
    ordered: bool = True
    window: int | None = None
    timeout: float | None = None
    retry: Retry | None = None
    on_error: OnError | Callable[[FailedItem], Any] = OnError.FAIL
    executor: Executor = "auto"
    size: int = 0
    max_wait: float | None = None
    limiter: Any = None


class Node:
    """Base of the graph's nodes; identity is what matters (shared prefixes)."""

    __slots__ = ()


class SourceNode(Node):
    __slots__ = ("source",)

    def __init__(self, source: Iterable[Any] | AsyncIterable[Any]) -> None:
        self.source = source


class StageNode(Node):
    __slots__ = ("spec", "upstream")

    def __init__(self, upstream: Node, spec: StageSpec) -> None:
        self.upstream = upstream
        self.spec = spec


class TeeNode(Node):
    __slots__ = ("branches", "upstream")

    def __init__(self, upstream: Node, branches: int) -> None:
        self.upstream = upstream
        self.branches = branches


class TeeBranch(Node):
    __slots__ = ("index", "tee")

    def __init__(self, tee: TeeNode, index: int) -> None:
        self.tee = tee
        self.index = index


class MergeNode(Node):
    __slots__ = ("upstreams",)

    def __init__(self, upstreams: tuple[Node, ...]) -> None:
        self.upstreams = upstreams
