"""The simulated BOSH director and its deployments: VMs as directory trees with real bbr
job scripts, and the Director API over them (SimBosh)."""

from simulator.calllog import ScriptCallRecord
from simulator.deployments import SimBosh, VmInfo
from simulator.director import SimDirector, sim_root
from simulator.director_db import Deployment, Vm
from simulator.instance import SimInstance

__all__ = [
    "Deployment",
    "ScriptCallRecord",
    "SimBosh",
    "SimDirector",
    "SimInstance",
    "Vm",
    "VmInfo",
    "sim_root",
]
