//! loraops gateway.
