"""Server reflection that shows the contract's JSON names (lowerCamelCase), as buf curl does.

Python's generated descriptors carry no json_name, so grpcurl, which prints the json_name a
server reflects, would show `story_id` where the protobuf JSON mapping and buf curl say
`storyId`. The official reflection servicer is kept; it only gets a descriptor pool of its
own whose files have every json_name filled in.
"""

from __future__ import annotations

from collections.abc import Iterable

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from google.rpc import error_details_pb2
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc


# The reflection API's stable name. grpcio-reflection ships only v1alpha, whose messages are
# the same on the wire; clients that speak only v1 (newer GUIs and CLIs) get the same servicer.
V1_SERVICE_NAME = "grpc.reflection.v1.ServerReflection"


def enable_reflection(server: grpc.aio.Server, service_names: Iterable[str]) -> None:
    """Serves reflection for `service_names` (and the reflection service itself), as v1alpha
    and as v1."""
    names = [*service_names, reflection.SERVICE_NAME, V1_SERVICE_NAME]
    servicer = reflection.aio.ReflectionServicer(names, pool=json_named_pool(names))
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    handler = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(V1_SERVICE_NAME, {"ServerReflectionInfo": handler}),)
    )


def json_named_pool(service_names: Iterable[str]) -> descriptor_pool.DescriptorPool:
    """A pool holding the files that define `service_names` and all their dependencies, each
    field with its json_name set.

    A name the default pool does not know (a service registered with a generic handler and
    no descriptor) is listed by reflection but has no file to describe, as before.
    """
    default = descriptor_pool.Default()
    files: dict[str, FileDescriptor] = {}
    for name in service_names:
        try:
            _collect_with_dependencies(default.FindServiceByName(name).file, files)
        except KeyError:
            continue
    # Every error's details (BadRequest, ErrorInfo, RetryInfo) are packed in Any: grpcurl
    # looks their types up by reflection, and without this file prints raw bytes.
    _collect_with_dependencies(error_details_pb2.DESCRIPTOR, files)
    pool = descriptor_pool.DescriptorPool()
    for file in files.values():  # dependencies were collected before their dependants
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        _fill_json_names(proto.message_type)
        pool.Add(proto)
    return pool


def json_name(field_name: str) -> str:
    """The protobuf JSON mapping of a field name: underscores dropped, the next letter upper
    case (protoc's ToJsonName), so `story_id` -> `storyId` and `page_size_2` -> `pageSize2`."""
    parts = field_name.split("_")
    return parts[0] + "".join(part[:1].upper() + part[1:] for part in parts[1:])


def _collect_with_dependencies(file: FileDescriptor, files: dict[str, FileDescriptor]) -> None:
    if file.name in files:
        return
    for dependency in file.dependencies:
        _collect_with_dependencies(dependency, files)
    files[file.name] = file


def _fill_json_names(messages: Iterable[descriptor_pb2.DescriptorProto]) -> None:
    # Extensions are left alone: protobuf forbids a json_name on them.
    for message in messages:
        for field in message.field:
            _fill_json_name(field)
        _fill_json_names(message.nested_type)


def _fill_json_name(field: descriptor_pb2.FieldDescriptorProto) -> None:
    # A json_name written in the .proto file wins, as it does for protoc.
    if not field.HasField("json_name"):
        field.json_name = json_name(field.name)
