"""The fault-injection suite (issue 7): real CLI workers, private servers, a ledger.

    pytest tests/faults -m faults            # every scenario; figures at the end
    pytest tests/faults -m faults --soak     # sizes x10
    pytest tests/faults -k "test_2_ and redis"

`harness.py` (Scenario, ledger, figures), `servers.py` (private Redis, RabbitMQ node,
tansu), `tasks.py` (the app the workers run), one test module per group of scenarios.
Each scenario prints one line of figures (lost, dup, recovery times), collected in the
terminal summary and in `<basetemp>/faults-report.txt`.
"""
