import os

# Before TensorFlow is first imported: keep its start-up chatter out of test output.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
