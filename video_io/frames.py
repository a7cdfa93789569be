from dataclasses import dataclass

import numpy as np


# eq=False: comparing frames field by field would compare arrays, which has no truth value.
@dataclass(frozen=True, eq=False)
class Frame:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    ts: float  # seconds from stream start
    index: int  # frame index in the source (or arrival order for pushed frames)
