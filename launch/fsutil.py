"""moved to fsutil; kept until the remaining importers move"""

from fsutil import *  # noqa: F403
