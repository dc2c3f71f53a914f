/* daxshim.h: what C programs need to talk to libdaxshim.so. */
#ifndef DAXSHIM_H
#define DAXSHIM_H

#include <sys/mman.h>

/*
 * MAP_DAX: per-mapping DAX opt-in. mmap(..., MAP_SHARED | MAP_DAX, fd, ...)
 * of a file on pmem gives the direct mapping instead of a page-cache shadow.
 * The shim strips the flag before the kernel sees it; without the shim the
 * kernel ignores it for MAP_SHARED, so the program degrades to an ordinary
 * mapping.
 */
#ifndef MAP_DAX
#define MAP_DAX 0x1000000
#endif

#endif /* DAXSHIM_H */
