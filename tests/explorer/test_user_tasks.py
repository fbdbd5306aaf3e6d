"""`modeling_csp.explorer.tasks`: user tasks are named by their content, kept per explorer (least recently used
dropped first), and an unknown name is an error that says what to do."""

from __future__ import annotations

import pytest

from modeling_csp.explorer.errors import UserError
from modeling_csp.explorer.tasks import CUSTOM_TASK, UserTasks

QUOTES = [["x = 'a", "'", '"'], ['y = "b', '"', "'"]]


def test_a_task_name_always_means_the_same_examples():
    tasks = UserTasks()
    task = tasks.register("my quotes!", QUOTES)
    assert CUSTOM_TASK.match(task.name) and task.name.startswith("custom:my_quotes:")
    assert UserTasks().register("my quotes!", QUOTES).name == task.name  # whoever registers them
    assert tasks.register("my quotes!", QUOTES[:1]).name != task.name
    assert tasks.resolve(task.name) is task and tasks.known(task.name)
    assert tasks.known("single_double_quote")  # the built-in tasks too


def test_the_least_recently_used_task_goes_first():
    tasks = UserTasks(limit=2)
    first, second = tasks.register("a", QUOTES), tasks.register("b", QUOTES)
    tasks.resolve(first.name)  # used: the second is now the oldest
    tasks.register("c", QUOTES)
    assert tasks.known(first.name) and not tasks.known(second.name)
    with pytest.raises(UserError, match="is not known here any more: open a run made for it"):
        tasks.resolve(second.name)
    with pytest.raises(UserError, match=r"unknown task 'nope' \(`csp tasks` lists them\)"):
        tasks.resolve("nope")
