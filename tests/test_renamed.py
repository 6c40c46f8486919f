"""The old names of what a target plug-in imports still resolve, with a DeprecationWarning
naming the new one (docs/migration.md); a name that never existed is still an AttributeError."""

import pytest

from m3i.mi import posteriors
from m3i.mi.targets import base


@pytest.mark.parametrize(
    ("module", "old", "new"),
    [
        (posteriors, "Bound", "LossAndMI"),
        (base, "mean_bound", "mean_loss_and_mi"),
        (base, "zero_bound", "no_samples"),
    ],
)
def test_an_old_name_warns_and_gives_the_new_object(module, old, new):
    with pytest.warns(DeprecationWarning, match=f"{old} is now {new}$"):
        found = getattr(module, old)
    assert found is getattr(module, new)


def test_an_unknown_name_is_still_an_attribute_error():
    with pytest.raises(AttributeError, match="has no attribute 'Boundary'"):
        posteriors.Boundary  # noqa: B018
    with pytest.raises(AttributeError, match="has no attribute 'max_bound'"):
        base.max_bound  # noqa: B018


def test_the_old_plugin_import_line_still_works():
    with pytest.warns(DeprecationWarning):
        from m3i.mi.posteriors import Bound  # noqa: F401
