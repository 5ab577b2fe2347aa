"""Radix tree over token ids at block granularity: which KV blocks already hold which token prefixes."""

from __future__ import annotations

from bisect import bisect_left, insort
from collections import OrderedDict
from collections.abc import Sequence


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


class Node:
    """One full KV block: the block_size token ids it holds, under the node of the preceding block."""

    __slots__ = ("tokens", "block", "parent", "children", "keys")

    def __init__(self, tokens: tuple[int, ...], block: int, parent: Node | None):
        self.tokens, self.block, self.parent = tokens, block, parent
        self.children: dict[tuple[int, ...], Node] = {}
        self.keys: list[tuple[int, ...]] = []  # the children's tokens, sorted, for the longest partial match


class PrefixCache:
    """Full blocks are inserted once computed and are immutable from then on. Blocks nobody references stay
    cached (so later prompts can hit them) until memory is needed; then least recently used leaves go first.
    Reference counts live with the block allocator; this tree only tracks content and recency.

    The allocator keeps every ancestor of a referenced node referenced (a sequence holds its whole path), so
    the unreferenced nodes are whole subtrees and evicting leaf after leaf can free every one of them:
    `num_evictable` is exact."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self.root = Node((), -1, None)
        self.node_of_block: dict[int, Node] = {}
        self._unreferenced: OrderedDict[int, Node] = OrderedDict()  # block -> node, least recently used first
        self.hit_blocks = 0
        self.miss_blocks = 0

    def __len__(self) -> int:
        return len(self.node_of_block)

    def match(self, tokens: list[int]) -> list[Node]:
        """The longest chain of cached full blocks that is a prefix of `tokens`."""
        nodes, node, bs = [], self.root, self.block_size
        for start in range(0, len(tokens) - bs + 1, bs):
            child = node.children.get(tuple(tokens[start : start + bs]))
            if child is None:
                break
            nodes.append(child)
            node = child
        return nodes

    def match_partial(self, node: Node, tokens: list[int]) -> tuple[Node, int] | None:
        """The child of `node` whose block starts with the most of `tokens` (fewer than a block), and how many.

        In sorted order the key sharing the longest prefix with `tokens` is a neighbour of where `tokens` would go.
        """
        query = tuple(tokens[: self.block_size])
        i = bisect_left(node.keys, query)
        best, best_len = None, 0
        for key in node.keys[max(0, i - 1) : i + 1]:
            n = common_prefix_len(key, query)
            if n > best_len:
                best, best_len = node.children[key], n
        return (best, best_len) if best is not None else None

    def count_lookup(self, hit: int, total: int) -> None:
        self.hit_blocks += hit
        self.miss_blocks += total - hit

    def insert(self, parent: Node, tokens: tuple[int, ...], block: int) -> Node:
        """Cache `block` as holding `tokens` after `parent`. If the same content is cached already (another
        sequence computed it first), the existing node wins and is returned."""
        existing = parent.children.get(tokens)
        if existing is not None:
            return existing
        node = Node(tokens, block, parent)
        parent.children[tokens] = node
        insort(parent.keys, tokens)
        self.node_of_block[block] = node
        return node

    def mark_unreferenced(self, block: int) -> None:
        node = self.node_of_block.get(block)
        if node is not None:
            self._unreferenced[block] = node
            self._unreferenced.move_to_end(block)

    def mark_referenced(self, block: int) -> None:
        self._unreferenced.pop(block, None)

    @property
    def num_evictable(self) -> int:
        return len(self._unreferenced)

    def evict(self) -> int:
        """Drop the least recently used unreferenced leaf; return its block for reuse."""
        block, node = next((b, n) for b, n in self._unreferenced.items() if not n.children)
        del self._unreferenced[block]
        del self.node_of_block[block]
        parent = node.parent
        del parent.children[node.tokens]
        del parent.keys[bisect_left(parent.keys, node.tokens)]
        return block
