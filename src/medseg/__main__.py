"""``python -m medseg`` (and ``torchrun -m medseg``, ``srun python -m medseg``): the command line."""
from medseg.cli import main

main()
