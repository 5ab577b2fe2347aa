"""Radix tree over token ids at block granularity: which KV blocks already hold which token prefixes."""

from __future__ import annotations

from collections import OrderedDict


class Node:
    """One full KV block: the block_size token ids it holds, under the node of the preceding block."""

    __slots__ = ("tokens", "block", "parent", "children")

    def __init__(self, tokens: tuple[int, ...], block: int, parent: Node | None):
        self.tokens, self.block, self.parent = tokens, block, parent
        self.children: dict[tuple[int, ...], Node] = {}


class PrefixCache:
    """Full blocks are inserted once computed and are immutable from then on. Blocks nobody references stay
    cached (so later prompts can hit them) until memory is needed; then least recently used leaves go first.
    Reference counts live with the block allocator; this tree only tracks content and recency."""

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

    def count_lookup(self, hit: int, total: int) -> None:
        self.hit_blocks += hit
        self.miss_blocks += total - hit

    def insert(self, parent: Node, tokens: tuple[int, ...], block: int) -> tuple[Node, bool]:
        """Cache `block` as holding `tokens` after `parent`. If the same content is cached already (two sequences
        computed it in the same step), the existing node wins and (node, False) is returned."""
        existing = parent.children.get(tokens)
        if existing is not None:
            return existing, False
        node = Node(tokens, block, parent)
        parent.children[tokens] = node
        self.node_of_block[block] = node
        return node, True

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

    def evict(self) -> int | None:
        """Drop the least recently used unreferenced leaf; return its block for reuse."""
        for block, node in self._unreferenced.items():
            if not node.children:
                del self._unreferenced[block]
                del self.node_of_block[block]
                del node.parent.children[node.tokens]
                return block
        return None
