"""Test support: one place for the helpers the tests share.

* `processes`: `dagster` CLI runs in their own process group (`run_cli`, `CliProcess`), the daemon,
  `kill_group`, `free_port`, `wait_until`.
* `env`: the service variables of a subprocess (`cli_env`), a DAGSTER_HOME, scratch databases, run config.
* `data`: what tests read back from PostgreSQL, MongoDB and the Dagster instance.
* `mongo_proxy`: the cuttable proxy in front of the MongoDB wire server (fault tests).
* `ui`: `dagster dev`, its GraphQL API and Chromium (browser test); `alerts`: webhook and SMTP receivers.
"""

from reconciliation_pipeline_tests.support.data import *  # noqa: F403
from reconciliation_pipeline_tests.support.env import *  # noqa: F403
from reconciliation_pipeline_tests.support.mongo_proxy import *  # noqa: F403
from reconciliation_pipeline_tests.support.processes import *  # noqa: F403
