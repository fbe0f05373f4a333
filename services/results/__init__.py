"""Live results of a session: 4D-STEM virtual images, centre of mass, DPC/iDPC and diffraction patterns
computed as positions arrive (`images`), their detector geometry (`geometry`), the scan file layout stempy
reads (`stem_file`), the in-process store a session's live view serves (`store`), the read-only web app
(`web`) and the Python client for notebooks (`client`)."""
