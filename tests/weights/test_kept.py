"""Tests of modelatlas.weights.kept: what a reader keeps of its last read for the next call on that tensor."""

from modelatlas.weights.kept import Kept


class _SwitchingName(str):
    """A tensor name whose comparison lets another thread keep another tensor in between (a thread switch
    inside ``take``, made deterministic)."""

    kept: Kept | None = None

    def __eq__(self, other):
        if self.kept is not None:
            kept, self.kept = self.kept, None
            kept.keep("layer.1", "bytes of layer.1")  # the other thread's read
        return str.__eq__(self, other)

    __hash__ = str.__hash__


def make_kept(name: str, data: str) -> Kept:
    kept = Kept()
    kept.keep(name, data)
    return kept


def test_take_gives_the_named_tensor_once():
    kept = make_kept("layer.0", "bytes of layer.0")
    assert kept.take("layer.1") is None
    assert kept.take("layer.0") == "bytes of layer.0"
    assert kept.take("layer.0") is None


def test_take_never_gives_another_tensor_kept_meanwhile():
    # two threads on one checkpoint: one takes layer.0 while the other's read keeps layer.1; take gave layer.1's
    # bytes as layer.0's (its check and its fetch read the slot apart)
    kept = make_kept("layer.0", "bytes of layer.0")
    name = _SwitchingName("layer.0")
    name.kept = kept
    got = kept.take(name)
    assert got in ("bytes of layer.0", None)
