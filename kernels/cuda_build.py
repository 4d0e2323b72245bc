"""Build csrc/ outside setup.py (no torch headers, so fast):

    python -m kernels.cuda_build --fatbin [PATH]   # torch-independent .so of the C launchers, sm_80 + sm_90a
    python -m kernels.cuda_build --emulated        # the emulated (g++ -DALIGNFLOW_CUEMU) objects the tests load
    python -m kernels.cuda_build --cubins          # per-arch cubins and their ptxas register/spill report
"""
import sys

from ._cuda import main

if __name__ == "__main__":
    sys.exit(main())
