import pytest

from distill.registry import Registry


def test_register_create_list_and_errors():
    reg = Registry("widget")

    @reg.register(size=3)
    def alpha(x=1):
        return ("alpha", x)

    reg.register(lambda: "b", name="beta")
    assert reg.list() == ["alpha", "beta"]
    assert reg.list("a*") == ["alpha"]
    assert reg.create("alpha", x=None) == ("alpha", 1)  # None kwargs are dropped
    assert reg.create("alpha", x=5) == ("alpha", 5)
    assert reg.meta("alpha") == {"size": 3}
    with pytest.raises(KeyError, match="Did you mean 'alpha'"):
        reg.create("alpah")
    with pytest.raises(ValueError, match="already registered"):
        reg.register(lambda: 0, name="alpha")
