"""Transport layer: each transport converts its messages for the serving core and maps its errors."""
