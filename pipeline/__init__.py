# Every process that runs this project's code (the driver, each Ray worker) imports this package
# before any of its modules: the S3 retry policy is set here, before any filesystem is made.
from pipeline import object_store as _object_store  # noqa: F401
