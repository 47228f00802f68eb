"""Data, as one import: :mod:`.records` (read and validate files) and :mod:`.batching` (tokenize,
label, collate, order). Every public name of both is available here, as before the split.
"""

from . import batching, records
from .batching import *  # noqa: F403 - re-exported on purpose
from .records import *  # noqa: F403

__all__ = [*records.__all__, *batching.__all__]
