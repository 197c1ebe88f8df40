"""The simulated BOSH director: a VM as a directory tree with real bbr job scripts."""

from simulator.calllog import ScriptCallRecord
from simulator.director import SimDirector, sim_root
from simulator.director_db import Deployment, Vm
from simulator.instance import SimInstance

__all__ = ["Deployment", "ScriptCallRecord", "SimDirector", "SimInstance", "Vm", "sim_root"]
