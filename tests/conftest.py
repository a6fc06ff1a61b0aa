import os
import sys

sys.path.insert(0, os.path.dirname(__file__))   # gpu_harness for the tests and their workers
