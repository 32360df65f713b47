"""``python -m relion_wrapper``: same as the ``cryo-drvae-relion`` console script."""

from relion_wrapper.external_job import main

main()
