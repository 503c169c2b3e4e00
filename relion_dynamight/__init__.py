"""relion-dynamight: DynaMight flexibility analysis as RELION jobs.

The package is imported lazily by the console launcher (``relion_dynamight.launcher``) so that an
import failure still leaves ``RELION_JOB_EXIT_FAILURE`` in the job directory.
"""

__version__ = "0.1.0"
