"""The Sparkplug B payload schema, built in Python (no protoc, no generated file).

Written from the Eclipse Sparkplug specification (3.0, chapter "Payloads"):
message, field and enum numbers are the specification's; the schema lives in
a private descriptor pool, so it cannot clash with another copy of the same
proto loaded by a plant's own code. `Payload` is the message class of a
Sparkplug B MQTT payload; `Payload.Metric` and the rest are its nested types.

Imports protobuf at import time: `tagwriter.sources.sparkplug` imports this
module lazily, so a missing `[mqtt]` extra is one clear ConfigError there.
"""

from __future__ import annotations

from enum import IntEnum
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

PACKAGE = "org.eclipse.tahu.protobuf"  # the specification's package name
_F = descriptor_pb2.FieldDescriptorProto
_MAX_FIELD_NUMBER = 536_870_912  # exclusive end of an `extensions N to max` range


class DataType(IntEnum):
    """Sparkplug B data types (metric `datatype`, property `type`, data set `types`)."""

    Unknown = 0
    Int8 = 1
    Int16 = 2
    Int32 = 3
    Int64 = 4
    UInt8 = 5
    UInt16 = 6
    UInt32 = 7
    UInt64 = 8
    Float = 9
    Double = 10
    Boolean = 11
    String = 12
    DateTime = 13
    Text = 14
    UUID = 15
    DataSet = 16
    Bytes = 17
    File = 18
    Template = 19
    PropertySet = 20
    PropertySetList = 21
    Int8Array = 22
    Int16Array = 23
    Int32Array = 24
    Int64Array = 25
    UInt8Array = 26
    UInt16Array = 27
    UInt32Array = 28
    UInt64Array = 29
    FloatArray = 30
    DoubleArray = 31
    BooleanArray = 32
    StringArray = 33
    DateTimeArray = 34


# A field: (name, number, type, type name of a message field or "", in the message's oneof `value`?).
_Field = tuple[str, int, int, str, bool]
_U32, _U64, _FLOAT, _DOUBLE = _F.TYPE_UINT32, _F.TYPE_UINT64, _F.TYPE_FLOAT, _F.TYPE_DOUBLE
_BOOL, _STRING, _BYTES, _MSG = _F.TYPE_BOOL, _F.TYPE_STRING, _F.TYPE_BYTES, _F.TYPE_MESSAGE
_REPEATED = 1 << 16  # or-ed into a type: the field is repeated


def _ref(path: str) -> str:
    return f".{PACKAGE}.Payload.{path}"


def _scalar_value_fields(first: int, extension: str) -> list[_Field]:
    """The oneof `value` shared by Template.Parameter and DataSet.DataSetValue, from field `first`."""
    kinds = [("int_value", _U32), ("long_value", _U64), ("float_value", _FLOAT),
             ("double_value", _DOUBLE), ("boolean_value", _BOOL), ("string_value", _STRING)]
    fields: list[_Field] = [(name, first + i, kind, "", True) for i, (name, kind) in enumerate(kinds)]
    fields.append(("extension_value", first + len(kinds), _MSG, _ref(extension), True))
    return fields


def _message(
    name: str,
    fields: list[_Field],
    *,
    nested: tuple[descriptor_pb2.DescriptorProto, ...] = (),
    extensions_from: int | None = None,
) -> descriptor_pb2.DescriptorProto:
    """One proto2 message; fields flagged in-oneof belong to its oneof `value`."""
    msg = descriptor_pb2.DescriptorProto(name=name)
    if any(in_oneof for *_, in_oneof in fields):
        msg.oneof_decl.add(name="value")
    for field_name, number, kind, type_name, in_oneof in fields:
        label = _F.LABEL_REPEATED if kind & _REPEATED else _F.LABEL_OPTIONAL
        f = msg.field.add(name=field_name, number=number, label=label, type=kind & ~_REPEATED)
        if type_name:
            f.type_name = type_name
        if in_oneof:
            f.oneof_index = 0
    msg.nested_type.extend(nested)
    if extensions_from is not None:
        msg.extension_range.add(start=extensions_from, end=_MAX_FIELD_NUMBER)
    return msg


def _extension(name: str) -> descriptor_pb2.DescriptorProto:
    """A `...ValueExtension { extensions 1 to max; }` placeholder message."""
    return _message(name, [], extensions_from=1)


def _payload_descriptor() -> descriptor_pb2.DescriptorProto:
    parameter = _message(
        "Parameter",
        [("name", 1, _STRING, "", False), ("type", 2, _U32, "", False),
         *_scalar_value_fields(3, "Template.Parameter.ParameterValueExtension")],
        nested=(_extension("ParameterValueExtension"),),
    )
    template = _message(
        "Template",
        [("version", 1, _STRING, "", False), ("metrics", 2, _MSG | _REPEATED, _ref("Metric"), False),
         ("parameters", 3, _MSG | _REPEATED, _ref("Template.Parameter"), False),
         ("template_ref", 4, _STRING, "", False), ("is_definition", 5, _BOOL, "", False)],
        nested=(parameter,), extensions_from=6,
    )
    dataset_value = _message(
        "DataSetValue", _scalar_value_fields(1, "DataSet.DataSetValue.DataSetValueExtension"),
        nested=(_extension("DataSetValueExtension"),),
    )
    row = _message("Row", [("elements", 1, _MSG | _REPEATED, _ref("DataSet.DataSetValue"), False)],
                   extensions_from=2)
    dataset = _message(
        "DataSet",
        [("num_of_columns", 1, _U64, "", False), ("columns", 2, _STRING | _REPEATED, "", False),
         ("types", 3, _U32 | _REPEATED, "", False), ("rows", 4, _MSG | _REPEATED, _ref("DataSet.Row"), False)],
        nested=(dataset_value, row), extensions_from=5,
    )
    property_value = _message(
        "PropertyValue",
        [("type", 1, _U32, "", False), ("is_null", 2, _BOOL, "", False),
         ("int_value", 3, _U32, "", True), ("long_value", 4, _U64, "", True),
         ("float_value", 5, _FLOAT, "", True), ("double_value", 6, _DOUBLE, "", True),
         ("boolean_value", 7, _BOOL, "", True), ("string_value", 8, _STRING, "", True),
         ("propertyset_value", 9, _MSG, _ref("PropertySet"), True),
         ("propertysets_value", 10, _MSG, _ref("PropertySetList"), True),
         ("extension_value", 11, _MSG, _ref("PropertyValue.PropertyValueExtension"), True)],
        nested=(_extension("PropertyValueExtension"),),
    )
    property_set = _message(
        "PropertySet",
        [("keys", 1, _STRING | _REPEATED, "", False),
         ("values", 2, _MSG | _REPEATED, _ref("PropertyValue"), False)],
        extensions_from=3,
    )
    property_set_list = _message(
        "PropertySetList", [("propertyset", 1, _MSG | _REPEATED, _ref("PropertySet"), False)], extensions_from=2
    )
    metadata = _message(
        "MetaData",
        [("is_multi_part", 1, _BOOL, "", False), ("content_type", 2, _STRING, "", False),
         ("size", 3, _U64, "", False), ("seq", 4, _U64, "", False), ("file_name", 5, _STRING, "", False),
         ("file_type", 6, _STRING, "", False), ("md5", 7, _STRING, "", False),
         ("description", 8, _STRING, "", False)],
        extensions_from=9,
    )
    metric = _message(
        "Metric",
        [("name", 1, _STRING, "", False), ("alias", 2, _U64, "", False), ("timestamp", 3, _U64, "", False),
         ("datatype", 4, _U32, "", False), ("is_historical", 5, _BOOL, "", False),
         ("is_transient", 6, _BOOL, "", False), ("is_null", 7, _BOOL, "", False),
         ("metadata", 8, _MSG, _ref("MetaData"), False), ("properties", 9, _MSG, _ref("PropertySet"), False),
         ("int_value", 10, _U32, "", True), ("long_value", 11, _U64, "", True),
         ("float_value", 12, _FLOAT, "", True), ("double_value", 13, _DOUBLE, "", True),
         ("boolean_value", 14, _BOOL, "", True), ("string_value", 15, _STRING, "", True),
         ("bytes_value", 16, _BYTES, "", True), ("dataset_value", 17, _MSG, _ref("DataSet"), True),
         ("template_value", 18, _MSG, _ref("Template"), True),
         ("extension_value", 19, _MSG, _ref("Metric.MetricValueExtension"), True)],
        nested=(_extension("MetricValueExtension"),),
    )
    return _message(
        "Payload",
        [("timestamp", 1, _U64, "", False), ("metrics", 2, _MSG | _REPEATED, _ref("Metric"), False),
         ("seq", 3, _U64, "", False), ("uuid", 4, _STRING, "", False), ("body", 5, _BYTES, "", False)],
        nested=(template, dataset, property_value, property_set, property_set_list, metadata, metric),
        extensions_from=6,
    )


def _file_descriptor() -> descriptor_pb2.FileDescriptorProto:
    file = descriptor_pb2.FileDescriptorProto(name="sparkplug_b.proto", package=PACKAGE, syntax="proto2")
    enum = file.enum_type.add(name="DataType")
    for member in DataType:
        enum.value.add(name=member.name, number=member.value)
    file.message_type.append(_payload_descriptor())
    return file


def _build() -> Any:
    pool = descriptor_pool.DescriptorPool()
    pool.Add(_file_descriptor())
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.Payload"))


#: The message class of a Sparkplug B payload (`Payload.FromString(data)`, `Payload.Metric`, ...).
Payload: Any = _build()
