"""numpy_f64.py with a planted bug: the causal bound off by one.

Query t of sequence b also sees position len_b − T + t + 1, the one just past its last visible
position, whenever that lies inside the capacity. For the last query that slot is past the
sequence's length, so it holds poison; for the others it holds a later token. The judge must
report FAIL on every case where such a row exists; this runner proves it can.

    python3 examples/external/planted_bug.py cases/ && vkdecode judge cases/   # must fail
"""

import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy_f64  # noqa: E402
import vkrun  # noqa: E402

if __name__ == "__main__":
    vkrun.main(attention=functools.partial(numpy_f64.attention, see_past=1))
