"""The trainer: loop, optimizer and schedules, checkpoints, evaluation."""

# moa_train.config registers the package's tasks, whose modules are in this package: importing it
# first lets any module here be the first one a program imports
import moa_train.config  # noqa: F401
