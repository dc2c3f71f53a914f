// Replica of the I/O a failure-atomic shim must do per kchashtest -oas record
// (BENCHMARKS.md, session 10, "Timestamps and the log's inode"):
// unit 1 (msync after grow): lane record + fdatasync(lane), apply lines + size;
// unit 2 (fsync after shrink): lane record + fdatasync(lane), apply size;
// every LANES units: fdatasync(data).
//
//   cc -O2 -o kc_atomic_io kc_atomic_io.c
//   mkdir -p /tmp/r && ./kc_atomic_io /tmp/r RECORDS LANES [FSTAT [ONE]]
//
// FSTAT: 1 = fstat the lane before each lane write, 2 = fstat the data file
// before each lane write and after the apply, 3 = both (what a query of the
// times costs); ONE = 1: the lanes are 8 slots of one file. Device writes:
// /sys/block/<dev>/stat, field 5, before and after.
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/stat.h>
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
int main(int argc,char**argv){
  const char*dir=argv[1]; int n=atoi(argv[2]); int lanes=atoi(argv[3]); int noflush=0; int fst=argc>4?atoi(argv[4]):0; int one=argc>5?atoi(argv[5]):0; struct stat st;
  char p[4096]; snprintf(p,sizeof p,"%s/data",dir);
  int d=open(p,O_RDWR|O_CREAT|O_TRUNC,0644);
  char buf[8192]; memset(buf,'x',sizeof buf);
  for(long o=0;o<6300000;o+=8192) pwrite(d,buf,8192,o);
  fsync(d);
  int lf[64];
  for(int i=0;i<lanes;i++){snprintf(p,sizeof p,"%s/lane%d",dir,one?0:i);lf[i]=open(p,O_RDWR|O_CREAT|(one&&i?0:O_TRUNC),0644);pwrite(lf[i],buf,4096,one?i*4096:0);fsync(lf[i]);}
  long gen=0; double t0=now();
  for(int r=0;r<n;r++){
    long small=6298008+32*r;
    ftruncate(d,9457664);
    // unit 1
    if(fst&1) fstat(lf[gen%lanes],&st); if(fst&2) fstat(d,&st); pwrite(lf[gen%lanes],buf,384,one?(gen%lanes)*4096:0); fdatasync(lf[gen%lanes]);
    pwrite(d,buf,64,0); pwrite(d,buf,64,460224); pwrite(d,buf,128,small-64);
    if(fst&2) fstat(d,&st);
    gen++; if(gen%lanes==0 && !noflush) fdatasync(d);
    ftruncate(d,small);
    // unit 2
    if(fst&1) fstat(lf[gen%lanes],&st); if(fst&2) fstat(d,&st); pwrite(lf[gen%lanes],buf,80,one?(gen%lanes)*4096:0); fdatasync(lf[gen%lanes]);
    gen++; if(gen%lanes==0 && !noflush) fdatasync(d);
  }
  double t=now()-t0;
  printf("lanes %d: %.1f us/record\n",lanes,t/n*1e6);
  return 0;
}
