"""InodeTable's parent -> children index agrees with its path index after any sequence of
upserts, forgets, moves, removals and subtree invalidations (pure logic, no store)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from s3fs_stream.inode_table import InodeTable

NAMES = ["a", "b", "a/x", "a/y", "b/x", "a/x/deep", "c"]

operations = st.lists(st.one_of(
    st.tuples(st.just("upsert"), st.sampled_from(NAMES), st.booleans(), st.integers(0, 3)),
    st.tuples(st.just("lookup"), st.sampled_from(NAMES)),
    st.tuples(st.just("forget"), st.sampled_from(NAMES)),
    st.tuples(st.just("move"), st.sampled_from(NAMES), st.sampled_from(NAMES)),
    st.tuples(st.just("remove"), st.sampled_from(NAMES)),
    st.tuples(st.just("invalidate"), st.sampled_from(NAMES)),
    st.tuples(st.just("adopt"), st.sampled_from(NAMES)),
), max_size=40)


def scanned_children(table: InodeTable, directory: str) -> dict:
    prefix = directory + "/" if directory else ""
    return {path[len(prefix):]: node for path, node in table._by_path.items()
            if path.startswith(prefix) and path and "/" not in path[len(prefix):]}


@settings(max_examples=300, deadline=None, derandomize=True)
@given(operations)
def test_children_index_matches_paths(ops):
    table = InodeTable(0, 0, 0o755)
    dropped = []  # nodes a FORGET took out of the table (a readdir may adopt them again)
    for op in ops:
        kind, path = op[0], op[1]
        node = table.by_path(path)
        if kind == "upsert":
            table.upsert(path, op[2], mode=0o100644, uid=0, gid=0, mtime_ns=0, size=op[3],
                         etag=str(op[3]))
        elif kind == "lookup" and node is not None:
            node.lookups += 1
        elif kind == "forget" and node is not None:
            table.forget(node.inode, 1)
            if table.get(node.inode) is None:
                dropped.append(node)
        elif kind == "adopt" and dropped:
            table.adopt(dropped.pop())
        elif kind == "move":
            table.move(path, op[2])
        elif kind == "remove":
            table.remove_path(path)
        elif kind == "invalidate":
            table.invalidate_subtree(path)
        for directory in ["", "a", "b", "a/x", "c"]:
            assert table.children(directory) == scanned_children(table, directory)
        assert all(table.by_path(n.path) is n for d in table._children.values()
                   for n in d.values())


def test_an_adopted_node_is_its_parents_child_again():
    """readdir puts back a node a FORGET dropped while it waited (Namespace._collect)."""
    table = InodeTable(0, 0, 0o755)
    node = table.upsert("a/x", False, mode=0o100644, uid=0, gid=0, mtime_ns=0)
    table.forget(node.inode, 1)
    assert table.get(node.inode) is None and table.children("a") == {}
    assert table.adopt(node) is node
    assert table.children("a") == {"x": node} and table.by_path("a/x") is node
