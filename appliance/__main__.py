"""`python -m appliance` runs the admin CLI."""

import sys

from appliance.admin.cli import main

sys.exit(main())
