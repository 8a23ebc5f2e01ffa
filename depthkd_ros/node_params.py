"""What every depthkd node shares: setup-or-clean-up, declared parameters, QoS, main().

A node lists its parameters as ``ParamSpec``s; ``declare_params`` declares them
with descriptions, ranges and read-only flags and returns their values, checked
against their choices, so a bad value stops the node with a message naming it.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from typing import Any, Callable

import rclpy
from rcl_interfaces.msg import FloatingPointRange, IntegerRange, ParameterDescriptor
from rclpy.event_handler import SubscriptionEventCallbacks
from rclpy.executors import ExternalShutdownException
from rclpy.node import Node
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy

WARN_THROTTLE_SEC = 5.0
RELIABILITY = {"best_effort": ReliabilityPolicy.BEST_EFFORT,
               "reliable": ReliabilityPolicy.RELIABLE}
INPUT_RELIABILITY = (*RELIABILITY, "auto")
AUTO_QOS_PERIOD_SEC = 1.0  # how often `auto` inputs compare themselves with their publishers


@dataclass(frozen=True)
class ParamSpec:
    """One declared parameter: default (fixes the type), description, range or choices."""

    name: str
    default: Any
    description: str
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()
    dynamic: bool = False  # settable at run time; the rest are read-only


class SetupNode(Node):
    """A node built by ``_setup`` after ``Node.__init__``. A setup that fails (a missing
    model, a bad parameter) destroys the half-built node, so its publishers and
    subscriptions do not outlive the error, and re-raises. Subclasses' own
    ``destroy_node`` runs only for fully built nodes."""

    def __init__(self, node_name: str, **kwargs: Any) -> None:
        super().__init__(node_name, **kwargs)
        try:
            self._setup()
        except BaseException:
            Node.destroy_node(self)
            raise

    def _setup(self) -> None:
        raise NotImplementedError


def descriptor(spec: ParamSpec) -> ParameterDescriptor:
    """ParameterDescriptor with description, numeric range or choices, read_only flag."""
    desc = ParameterDescriptor(name=spec.name, description=spec.description,
                               read_only=not spec.dynamic)
    if spec.choices:
        desc.additional_constraints = "one of: " + ", ".join(spec.choices)
    elif isinstance(spec.default, float):
        desc.floating_point_range = [FloatingPointRange(from_value=float(spec.low),
                                                        to_value=float(spec.high))]
    elif isinstance(spec.default, int) and not isinstance(spec.default, bool):
        desc.integer_range = [IntegerRange(from_value=int(spec.low), to_value=int(spec.high),
                                           step=1)]
    return desc


def check_choices(specs: tuple[ParamSpec, ...], values: dict[str, Any]) -> None:
    """ValueError naming the first parameter whose value is not one of its choices."""
    for spec in specs:
        if spec.choices and values[spec.name] not in spec.choices:
            raise ValueError(f"parameter {spec.name} must be one of {', '.join(spec.choices)}, "
                             f"got {values[spec.name]!r}")


def declare_params(node: Node, specs: tuple[ParamSpec, ...]) -> dict[str, Any]:
    """Declare every spec on ``node``; return the values (overrides applied), choices checked."""
    for spec in specs:
        node.declare_parameter(spec.name, spec.default, descriptor(spec))
    values = {spec.name: node.get_parameter(spec.name).value for spec in specs}
    check_choices(specs, values)
    return values


def qos(reliability: str, depth: int) -> QoSProfile:
    """KEEP_LAST ``depth`` with the named reliability (a RELIABILITY key)."""
    return QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=depth,
                      reliability=RELIABILITY[reliability])


def matching_reliability(offered: list[str]) -> str:
    """The reliability ``auto`` subscribes with, given what the topic's publishers offer
    (rosbag2's adaptive QoS rule): reliable only when every publisher is reliable, as a
    reliable subscription never matches a best-effort publisher; best_effort while there
    is none, because it matches either kind and so sees the first one arrive."""
    return "reliable" if offered and all(r == "reliable" for r in offered) else "best_effort"


class InputSubscription:
    """A subscription with a fixed reliability, or ``auto``: ``match()`` re-creates it when
    its publishers ask for the other reliability (the node calls it periodically)."""

    def __init__(self, node: Node, msg_type: type, topic: str, callback: Callable[[Any], None],
                 reliability: str, depth: int) -> None:
        self._node, self._type, self._topic, self._callback = node, msg_type, topic, callback
        self._depth = depth
        self.auto = reliability == "auto"
        self.reliability = "best_effort" if self.auto else reliability
        self._subscription = self._subscribe()
        if self.auto:
            self.match()

    def _subscribe(self) -> Any:
        # auto: a publisher this subscription cannot match is why the next match() switches,
        # not a warning for the user, which is what rclpy's default handler makes of it.
        events = (SubscriptionEventCallbacks(incompatible_qos=lambda info: None)
                  if self.auto else None)
        return self._node.create_subscription(self._type, self._topic, self._callback,
                                              qos(self.reliability, self._depth),
                                              event_callbacks=events)

    def offered(self) -> list[str]:
        """The reliability each publisher of the (remapped, namespaced) topic offers."""
        infos = self._node.get_publishers_info_by_topic(self._node.resolve_topic_name(self._topic))
        return ["reliable" if info.qos_profile.reliability == ReliabilityPolicy.RELIABLE
                else "best_effort" for info in infos]

    def match(self) -> None:
        offered = self.offered()
        wanted = matching_reliability(offered)
        if not self.auto or wanted == self.reliability:
            return
        # DDS fixes a reader's reliability when it is created, so the subscription is
        # replaced; a frame in flight during the switch can be lost.
        self._node.destroy_subscription(self._subscription)
        self.reliability = wanted
        self._subscription = self._subscribe()
        self._node.get_logger().info(f"input {self._topic}: {wanted} to match its publishers "
                                     f"({', '.join(offered) or 'none'})")


def spin(make_node: Callable[[], Node], args: list[str] | None = None) -> None:
    """The standard node main() (ros2/demos style): Ctrl-C and external shutdown end quietly."""
    rclpy.init(args=args)
    node = None
    try:
        node = make_node()
        rclpy.spin(node)
    except (KeyboardInterrupt, ExternalShutdownException):
        pass
    except Exception:
        # Ctrl-C can land inside rclpy's C++ -> Python conversion of a message, which
        # reports the KeyboardInterrupt as a RuntimeError; once rclpy's SIGINT handler
        # has shut the context down that is the shutdown, not a failure.
        if rclpy.ok():
            raise
    finally:
        # Ctrl-C in a terminal reaches a launched node twice: from the terminal (the
        # whole process group) and forwarded by ros2 launch. The second one must not
        # break the cleanup the first started (a KeyboardInterrupt traceback, exit -2).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if node is not None:
            node.destroy_node()
        rclpy.try_shutdown()
