// The least a durable commit costs: one 4 KiB overwrite of a preallocated
// file and fdatasync, 2,000 times (BENCHMARKS.md, session 10, "Why 1.3x
// over WAL is out of reach").
//
//   cc -O2 -o durable_commit durable_commit.c && ./durable_commit /tmp/f
#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <unistd.h>
#include <time.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec*1e9+t.tv_nsec;}
int main(int argc,char**argv){ int n=2000; int fd=open(argv[1],O_RDWR|O_CREAT|O_TRUNC,0644); char buf[8192]; memset(buf,1,8192);
 for(int i=0;i<64;i++) pwrite(fd,buf,8192,(off_t)i*8192); fsync(fd);
 double t0=now(); for(int i=0;i<n;i++){ buf[0]=i; pwrite(fd,buf,4096,(off_t)(i%64)*8192); fdatasync(fd);} 
 printf("minimal durable commit (4 KiB overwrite + fdatasync): %.1f us\n",(now()-t0)/n/1000); }
